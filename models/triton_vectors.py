"""Helpers the fused kernels share: an optional per-column vector, such as the bias of the
product whose output a kernel reads (models/layer_norm_triton.py,
models/hardswish_dropout_triton.py, models/causal_conv_triton.py); a tensor's rows as
the 2-D view the row-wise kernels take (models/layer_norm_triton.py,
models/gated_norm_triton.py, models/products_triton.py); and `row_sums`, the second pass
of the per-program partial sums the backward kernels write for their parameters'
gradients."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.triton_launch import COMPILE_OPTIONS


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit stride along N: a view where the layout allows (a
    column slice of a wider tensor stays one), else a contiguous copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def optional_vector(ptr, offs, mask, PRESENT: tl.constexpr):
    """ptr[offs] in float32 where `mask` (0 elsewhere); zeros when not PRESENT (ptr None)."""
    if PRESENT:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros(offs.shape, dtype=tl.float32)


@triton.jit
def _row_sums(x_ptr, y_ptr, P, BLOCK_P: tl.constexpr):
    """y[r] = sum of x[r, :P], one program per row, in a fixed order (deterministic)."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(x_ptr + row * P + cols, mask=cols < P, other=0.0)
    tl.store(y_ptr + row, tl.sum(acc, axis=0))


def row_sums(partials: torch.Tensor) -> torch.Tensor:
    """Contiguous float32 partials (..., P) summed over P -> (...).

    The fused kernels' weight and bias gradients leave one partial sum per program, rows
    of a few hundred to a few thousand; PyTorch's `sum(-1)` takes 3-6 us on them on an
    H200 and this 1.5-2.8 us (one program per row; docs/performance_notes.md, "Partial
    sums on Triton"), some 18 times per training step.
    """
    if partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError("row_sums takes contiguous float32 partial sums")
    *lead, P = partials.shape
    out = torch.empty(lead, device=partials.device, dtype=torch.float32)
    if out.numel():
        block_p = min(1024, triton.next_power_of_2(max(P, 1)))
        _row_sums[(out.numel(),)](partials, out, P, BLOCK_P=block_p, num_warps=4, **COMPILE_OPTIONS)
    return out
