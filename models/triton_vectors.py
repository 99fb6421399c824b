"""A Triton helper the fused kernels share: an optional per-column vector, such as the bias
of the product whose output a kernel reads (models/layer_norm_triton.py,
models/hardswish_dropout_triton.py, models/causal_conv_triton.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def optional_vector(ptr, offs, mask, PRESENT: tl.constexpr):
    """ptr[offs] in float32 where `mask` (0 elsewhere); zeros when not PRESENT (ptr None)."""
    if PRESENT:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros(offs.shape, dtype=tl.float32)
