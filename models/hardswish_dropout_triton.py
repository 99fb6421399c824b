"""Dropout(Hardswish(x)), fused, as Triton kernels: the FFN's activation.

TiM4Rec's FFN computes w_2(Dropout(Hardswish(w_1 x))) on (B * L, 4d) tensors, its largest
activations. In PyTorch that is a Hardswish kernel, a dropout kernel that also writes a
mask, and backward the mask's product and Hardswish's gradient: four passes over the
tensor (~0.26 ms per layer at the ML-1M step's shape on an H200, docs/performance_notes.md).
Here one kernel each way: forward reads x and writes the result; backward reads x and the
output's gradient and writes x's. The mask is not stored: both kernels draw it from the
call's seed (Philox, four draws per call with `tl.rand4x`; the seed comes from PyTorch's
CUDA generator, so CUDA graphs replay fresh masks). Float32 arithmetic; results in x's
dtype.

`models.layers.hardswish_dropout` dispatches here on the Triton backend and to
nn.functional otherwise; tests/test_hardswish_dropout.py compares the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.causal_conv_triton import hardswish, hardswish_grad
from models.triton_dropout import check_elements, dropout_seed

QUARTER = 1024  # a program handles 4 quarters of this many elements


@triton.jit
def _draws(seed_ptr, pid, QUARTER: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Four uniform draws per Philox call (`tl.rand4x`), one for each quarter's elements:
    a draw per element costs more than the memory traffic (Philox is integer multiplies)."""
    if HAS_DROPOUT:
        counters = pid * QUARTER + tl.arange(0, QUARTER)
        r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr).to(tl.uint32), counters)
    else:
        ones = tl.full([QUARTER], 1.0, tl.float32)
        r0, r1, r2, r3 = ones, ones, ones, ones
    return r0, r1, r2, r3


@triton.jit
def _fwd_quarter(x_ptr, y_ptr, offs, n, draw, p, HAS_DROPOUT: tl.constexpr):
    mask = offs < n
    y = hardswish(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    if HAS_DROPOUT:
        y = tl.where(draw >= p, y / (1.0 - p), 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_quarter(x_ptr, dy_ptr, dx_ptr, offs, n, draw, p, HAS_DROPOUT: tl.constexpr):
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * hardswish_grad(x)
    if HAS_DROPOUT:
        dx = tl.where(draw >= p, dx / (1.0 - p), 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hardswish_dropout_fwd(
    x_ptr, y_ptr, seed_ptr, n, p, HAS_DROPOUT: tl.constexpr, QUARTER: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid * 4 * QUARTER + tl.arange(0, QUARTER)
    r0, r1, r2, r3 = _draws(seed_ptr, pid, QUARTER, HAS_DROPOUT)
    _fwd_quarter(x_ptr, y_ptr, offs, n, r0, p, HAS_DROPOUT)
    _fwd_quarter(x_ptr, y_ptr, offs + QUARTER, n, r1, p, HAS_DROPOUT)
    _fwd_quarter(x_ptr, y_ptr, offs + 2 * QUARTER, n, r2, p, HAS_DROPOUT)
    _fwd_quarter(x_ptr, y_ptr, offs + 3 * QUARTER, n, r3, p, HAS_DROPOUT)


@triton.jit
def _hardswish_dropout_bwd(
    x_ptr, dy_ptr, dx_ptr, seed_ptr, n, p, HAS_DROPOUT: tl.constexpr, QUARTER: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid * 4 * QUARTER + tl.arange(0, QUARTER)
    r0, r1, r2, r3 = _draws(seed_ptr, pid, QUARTER, HAS_DROPOUT)
    _bwd_quarter(x_ptr, dy_ptr, dx_ptr, offs, n, r0, p, HAS_DROPOUT)
    _bwd_quarter(x_ptr, dy_ptr, dx_ptr, offs + QUARTER, n, r1, p, HAS_DROPOUT)
    _bwd_quarter(x_ptr, dy_ptr, dx_ptr, offs + 2 * QUARTER, n, r2, p, HAS_DROPOUT)
    _bwd_quarter(x_ptr, dy_ptr, dx_ptr, offs + 3 * QUARTER, n, r3, p, HAS_DROPOUT)


class HardswishDropout(torch.autograd.Function):
    """Dropout_p(Hardswish(x)) for any shape (computed on a contiguous copy if need be)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        x = x.contiguous()
        n = x.numel()
        check_elements(n, "hardswish_dropout")
        y = torch.empty_like(x)
        seed = dropout_seed(p, x.device)
        grid = (triton.cdiv(n, 4 * QUARTER),)
        _hardswish_dropout_fwd[grid](x, y, seed, n, p, HAS_DROPOUT=p > 0, QUARTER=QUARTER)
        ctx.save_for_backward(x, seed)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, seed = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), 4 * QUARTER),)
        _hardswish_dropout_bwd[grid](
            x, dy, dx, seed, x.numel(), ctx.p, HAS_DROPOUT=ctx.p > 0, QUARTER=QUARTER
        )
        return dx, None
