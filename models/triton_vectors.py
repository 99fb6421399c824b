"""Helpers the fused kernels share: an optional per-column vector, such as the bias of the
product whose output a kernel reads (models/layer_norm_triton.py,
models/hardswish_dropout_triton.py, models/causal_conv_triton.py), and a tensor's rows as
the 2-D view the row-wise kernels take (models/layer_norm_triton.py,
models/gated_norm_triton.py, models/products_triton.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
