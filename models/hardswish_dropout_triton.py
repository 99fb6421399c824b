"""Dropout(Hardswish(x + bias)), fused, as Triton kernels: the FFN's activation.

TiM4Rec's FFN computes w_2(Dropout(Hardswish(w_1 x + b_1))) on (B * L, 4d) tensors, its
largest activations. In PyTorch that is a Hardswish kernel, a dropout kernel that also
writes a mask, and backward the mask's product and Hardswish's gradient: four passes over
the tensor (~0.26 ms per layer at the ML-1M step's shape on an H200,
docs/performance_notes.md), plus b_1's gradient, a reduction reading the tensor again.
Here one kernel each way: forward reads x and writes the result; backward reads x and the
output's gradient, writes x's, and adds up x's gradient along the rows of each program's
block: b_1's gradient (the product w_1 x then runs without b_1, which this op adds).

The mask is not stored: both kernels draw it from the call's seed (Philox, four draws per
call with `tl.rand4x`; the seed comes from PyTorch's CUDA generator, so CUDA graphs replay
fresh masks). Float32 arithmetic; results in x's dtype.

`models.layers.hardswish_dropout` dispatches here on the Triton backend and to
nn.functional otherwise; tests/test_hardswish_dropout.py compares the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.causal_conv_triton import hardswish, hardswish_grad
from models.triton_dropout import check_elements, dropout_seed
from models.triton_launch import COMPILE_OPTIONS
from models.triton_vectors import optional_vector, row_sums

QUARTER_ELEMENTS = 1024  # rows x BLOCK_N of each of a row group's four blocks
# Row groups per program: one forward (most programs in flight); more backward, for fewer
# per-program bias sums to add up. The draws depend on the group, not on the program.
FWD_GROUPS, BWD_GROUPS = 1, 2


@triton.jit
def _draws(
    seed_ptr, group, cols, QROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr
):
    """Uniform draws for a row group's four blocks, four per Philox call (`tl.rand4x`): a
    draw per element costs more than the memory traffic (Philox is integer multiplies)."""
    if HAS_DROPOUT:
        counters = (group * QROWS + tl.arange(0, QROWS))[:, None] * BLOCK_N + cols[None, :]
        r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr).to(tl.uint32), counters)
    else:
        ones = tl.full([QROWS, BLOCK_N], 1.0, tl.float32)
        r0, r1, r2, r3 = ones, ones, ones, ones
    return r0, r1, r2, r3


@triton.jit
def _fwd_rows(x_ptr, y_ptr, rows, cols, b, M, N, draw, p, HAS_DROPOUT: tl.constexpr):
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    y = hardswish(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :])
    if HAS_DROPOUT:
        y = tl.where(draw >= p, y / (1.0 - p), 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows(x_ptr, dy_ptr, dx_ptr, rows, cols, b, M, N, draw, p, HAS_DROPOUT: tl.constexpr):
    """x's gradient for a block of rows, stored, and returned in float32 (zero outside)."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    dx = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * hardswish_grad(x)
    if HAS_DROPOUT:
        dx = tl.where(draw >= p, dx / (1.0 - p), 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return dx


@triton.jit
def _hardswish_dropout_fwd(
    x_ptr, b_ptr, y_ptr, seed_ptr, M, N, p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    QROWS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK_N)
    b = optional_vector(b_ptr, cols, cols < N, HAS_BIAS)
    for i in range(GROUPS):
        group = tl.program_id(0) * GROUPS + i
        rows = group * 4 * QROWS + tl.arange(0, QROWS)
        r0, r1, r2, r3 = _draws(seed_ptr, group, cols, QROWS, BLOCK_N, HAS_DROPOUT)
        _fwd_rows(x_ptr, y_ptr, rows, cols, b, M, N, r0, p, HAS_DROPOUT)
        _fwd_rows(x_ptr, y_ptr, rows + QROWS, cols, b, M, N, r1, p, HAS_DROPOUT)
        _fwd_rows(x_ptr, y_ptr, rows + 2 * QROWS, cols, b, M, N, r2, p, HAS_DROPOUT)
        _fwd_rows(x_ptr, y_ptr, rows + 3 * QROWS, cols, b, M, N, r3, p, HAS_DROPOUT)


@triton.jit
def _hardswish_dropout_bwd(
    x_ptr, b_ptr, dy_ptr, dx_ptr, db_ptr, seed_ptr, M, N, p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    QROWS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    b = optional_vector(b_ptr, cols, cols < N, HAS_BIAS)
    # the bias gradient: elementwise sums of the blocks, one reduction along rows at the end
    db = tl.zeros([QROWS, BLOCK_N], dtype=tl.float32)
    for i in range(GROUPS):
        group = pid * GROUPS + i
        rows = group * 4 * QROWS + tl.arange(0, QROWS)
        r0, r1, r2, r3 = _draws(seed_ptr, group, cols, QROWS, BLOCK_N, HAS_DROPOUT)
        db += _bwd_rows(x_ptr, dy_ptr, dx_ptr, rows, cols, b, M, N, r0, p, HAS_DROPOUT)
        db += _bwd_rows(x_ptr, dy_ptr, dx_ptr, rows + QROWS, cols, b, M, N, r1, p, HAS_DROPOUT)
        db += _bwd_rows(x_ptr, dy_ptr, dx_ptr, rows + 2 * QROWS, cols, b, M, N, r2, p, HAS_DROPOUT)
        db += _bwd_rows(x_ptr, dy_ptr, dx_ptr, rows + 3 * QROWS, cols, b, M, N, r3, p, HAS_DROPOUT)
    if HAS_BIAS:  # transposed, (N, programs): PyTorch adds up rows much faster than columns
        tl.store(db_ptr + cols * tl.num_programs(0) + pid, tl.sum(db, axis=0), mask=cols < N)


def _geometry(M: int, N: int, groups: int) -> tuple[int, int, int]:
    """Rows per block (a row group has four), the padded row length, and programs of
    `groups` row groups."""
    block_n = triton.next_power_of_2(N)
    qrows = max(1, QUARTER_ELEMENTS // block_n)
    return qrows, block_n, triton.cdiv(M, 4 * qrows * groups)


class HardswishDropout(torch.autograd.Function):
    """Dropout_p(Hardswish(x + bias)) over (..., N) tensors (computed on a contiguous copy
    if need be); `bias` (N,) may be None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, bias: torch.Tensor | None = None):
        x = x.contiguous()
        N = x.shape[-1]
        M = x.numel() // max(N, 1)
        check_elements(x.numel(), "hardswish_dropout")
        y = torch.empty_like(x)
        seed = dropout_seed(p, x.device)
        qrows, block_n, programs = _geometry(M, N, FWD_GROUPS)
        _hardswish_dropout_fwd[(programs,)](
            x, bias, y, seed, M, N, p, HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0,
            QROWS=qrows, BLOCK_N=block_n, GROUPS=FWD_GROUPS, **COMPILE_OPTIONS,
        )  # fmt: skip
        ctx.save_for_backward(x, bias, seed)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, bias, seed = ctx.saved_tensors
        N = x.shape[-1]
        M = x.numel() // max(N, 1)
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        qrows, block_n, programs = _geometry(M, N, BWD_GROUPS)
        db_partial = None
        if bias is not None:
            db_partial = torch.empty((N, programs), device=x.device, dtype=torch.float32)
        _hardswish_dropout_bwd[(programs,)](
            x, bias, dy, dx, db_partial, seed, M, N, ctx.p,
            HAS_BIAS=bias is not None, HAS_DROPOUT=ctx.p > 0,
            QROWS=qrows, BLOCK_N=block_n, GROUPS=BWD_GROUPS, **COMPILE_OPTIONS,
        )  # fmt: skip
        dbias = None if bias is None else row_sums(db_partial).to(bias.dtype)
        return dx, None, dbias
