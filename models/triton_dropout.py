"""Host side of dropout inside this project's Triton kernels (models/layer_norm_triton.py,
models/hardswish_dropout_triton.py).

Each call draws one seed; the kernels index their Philox draws (`tl.rand4x`) by it and an
int32 element offset, and the backward pass draws the same mask again from the saved
seed. The seed comes from PyTorch's generator on the tensors' device, so a CUDA graph
captures the draw and every replay gets fresh masks.
"""

from __future__ import annotations

import torch

MAX_ELEMENTS = 2**31 - 1  # the draws are indexed by int32 element offsets


def dropout_seed(p: float, device: torch.device) -> torch.Tensor | None:
    """The call's seed, a (1,) int64 tensor on `device`; None without dropout."""
    return torch.randint(2**31 - 1, (1,), device=device) if p > 0 else None


def check_elements(n: int, op: str) -> None:
    """Refuse tensors whose element offsets do not fit the draws' int32 index."""
    if n > MAX_ELEMENTS:
        raise ValueError(f"{op}: {n} elements, at most 2**31 - 1; split the batch")
