"""nn.Linear whose bias gradient is a Triton column sum.

PyTorch's backward of `F.linear` sums the output gradient over its rows with a generic
reduction kernel: for TiM4Rec's in_proj and first FFN layer at the ML-1M all-positions
step (128,200 rows of 324 and 256 columns) it takes ~120 us each in fp32 on an H200
(1.1-1.4 TB/s). Here each program adds up a block of rows in float32 registers and stores
one partial row, transposed; PyTorch adds up the few partial rows: ~60 us. At 64 columns
PyTorch's sum is faster (38 against 54 us), so `models.layers.linear` sends only outputs
of at least COLUMN_SUM_MIN_FEATURES columns here (docs/performance_notes.md). The matrix
products stay cuBLAS's, in the dtype autocast gives them, as F.linear's own backward
computes them. Deterministic: a fixed order of additions.

`models.layers.linear` dispatches here on the Triton backend; tests/test_linear.py compares
with F.linear (values and gradients, float32 and bf16 autocast; CUDA and the interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 512  # rows one program adds up
BLOCK_M = 32  # rows per load
MAX_BLOCK_N = 128  # columns per program


@triton.jit
def _column_sum_partial(
    x_ptr, partial_ptr,
    M, N, s_m,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """partial[n, pid] = sum of x[m, n] over this program's rows, in float32."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for offset in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = first + offset + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        tile = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * s_m + cols[None, :], mask=mask, other=0.0
        )
        acc += tile.to(tl.float32)
    partials = tl.num_programs(0)
    tl.store(partial_ptr + cols * partials + pid, tl.sum(acc, axis=0), mask=cols < N)


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """x (M, N), unit stride along N -> (N,) float32: the sum of its rows."""
    M, N = x.shape
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(N))
    grid = (triton.cdiv(M, ROWS_PER_PROGRAM), triton.cdiv(N, block_n))
    partial = torch.empty(N, grid[0], device=x.device, dtype=torch.float32)
    _column_sum_partial[grid](
        x, partial, M, N, x.stride(0),
        ROWS_PER_PROGRAM=ROWS_PER_PROGRAM, BLOCK_M=BLOCK_M, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return partial.sum(1)


class LinearColumnSumBias(torch.autograd.Function):
    """F.linear(x, weight, bias) with bias; under autocast its products run in autocast's
    dtype, as F.linear's."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            x_c, weight_c, bias_c = x.to(dtype), weight.to(dtype), bias.to(dtype)
        else:
            x_c, weight_c, bias_c = x, weight, bias
        ctx.save_for_backward(x_c, weight_c)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return F.linear(x_c, weight_c, bias_c)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy: torch.Tensor):
        x_c, weight_c = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dy2 = dy2.to(weight_c.dtype)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight_c).view(*dy.shape[:-1], weight_c.shape[1]).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dweight = (dy2.t() @ x_c.reshape(-1, x_c.shape[-1])).to(weight_dtype)
        if ctx.needs_input_grad[2]:
            dbias = column_sum(dy2).to(bias_dtype)
        return dx, dweight, dbias
