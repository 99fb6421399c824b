"""A split along the last axis whose gradient is one tensor the consumers write into.

TiSSDBlock splits in_proj's output into [z | xBC | dt]. Through `torch.split`, backward
concatenates the three blocks' gradients into a new tensor: a full read and write of the
widest activation in the step (~0.1 ms per layer at the ML-1M shape on an H200,
docs/performance_notes.md). Here the blocks' consumers (the gated norm's and the causal
convolution's backward kernels) write their input gradients straight into the columns of
one gradient tensor, `SharedGradient.block(i)`; the split's backward copies in only the
blocks nobody wrote there (dt's few columns, or everything when a consumer is not one of
those kernels), so the result always equals the concatenation. That tensor and in_proj's
output have rows padded to a multiple of 16 columns (`padded_empty`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ROW_ALIGNMENT = 16  # columns: Triton specialises strides divisible by 16


def padded_width(width: int) -> int:
    """`width` rounded up to a multiple of ROW_ALIGNMENT."""
    return -(-width // ROW_ALIGNMENT) * ROW_ALIGNMENT


def padded_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` whose rows are padded to padded_width columns (a
    view of the first shape[-1]): Triton then moves whole rows in 16-byte vectors. in_proj's
    324 columns are not a multiple of 16; its output (models/products_triton.py) and the
    gradient that comes back (SharedGradient) keep the padded stride."""
    *lead, width = shape
    return torch.empty(*lead, padded_width(width), dtype=dtype, device=device)[..., :width]


class SharedGradient:
    """The gradient of a tensor split along its last axis into column blocks: one tensor
    of the split tensor's shape and dtype, allocated when a block is first asked for."""

    def __init__(self, like: torch.Tensor, widths: list[int]) -> None:
        if sum(widths) != like.shape[-1]:
            raise ValueError(f"widths {widths} do not add up to the last axis {like.shape[-1]}")
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.widths = list(widths)
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self.columns = [(start, start + width) for start, width in zip(starts, widths)]
        self.tensor: torch.Tensor | None = None

    def full(self) -> torch.Tensor:
        """The whole gradient, its rows padded as the products' outputs (`padded_empty`)."""
        if self.tensor is None:
            self.tensor = padded_empty(self.shape, self.dtype, self.device)
        return self.tensor

    def block(self, index: int) -> torch.Tensor:
        """Block `index`'s columns of the gradient, a view to write that block's gradient
        into (the split's backward then leaves it as it is)."""
        start, stop = self.columns[index]
        return self.full()[..., start:stop]


def gradient_buffer(into: Callable[[], torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor:
    """The tensor a backward kernel writes the gradient of `like` into: `into()` where
    given and holding as many rows of like's width and dtype, else torch.empty_like."""
    if into is not None:
        t = into()
        if t.dtype == like.dtype and t.shape[-1] == like.shape[-1] and t.numel() == like.numel():
            return t
    return torch.empty_like(like)


def _written_in_place(grad: torch.Tensor, view: torch.Tensor) -> bool:
    return (
        grad.data_ptr() == view.data_ptr()
        and grad.shape == view.shape
        and grad.stride() == view.stride()
        and grad.dtype == view.dtype
    )


class _SplitColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, gradient: SharedGradient):
        ctx.gradient = gradient
        ctx.set_materialize_grads(False)  # an unused block's gradient arrives as None
        return tuple(t.split(gradient.widths, dim=-1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        gradient: SharedGradient = ctx.gradient
        full = gradient.full()
        for index, grad in enumerate(grads):
            view = gradient.block(index)
            if grad is None:
                view.zero_()
            elif not _written_in_place(grad, view):
                view.copy_(grad)
        # autograd owns `full` now; a second backward (retain_graph) must not write into it
        gradient.tensor = None
        return full, None


def split_columns(
    t: torch.Tensor, widths: list[int]
) -> tuple[tuple[torch.Tensor, ...], SharedGradient]:
    """torch.split(t, widths, dim=-1), and the SharedGradient its consumers may write
    their gradients into."""
    gradient = SharedGradient(t, widths)
    return _SplitColumns.apply(t, gradient), gradient
