"""LayerNorm(Dropout(x) + residual) over the last axis, fused, as Triton kernels.

    h = Dropout_p(x + x_bias) + residual   (x_bias and residual optional)
    y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias

TiM4Rec's post-norm residual connections (after each TiSSD block and each FFN) and its
embedding norm are this. In PyTorch each is a dropout, an add and nn.LayerNorm forward, and
as many kernels backward, plus the weight and bias reductions; PyTorch's LayerNorm runs one
row per thread block, slow for rows of 64 (180 us forward for 120,000 rows on an H200,
13 us of memory traffic; docs/performance_notes.md). Here a program normalises four
blocks of rows: one kernel forward, one backward (input and residual gradients, and
per-program weight and bias sums, added up by PyTorch: deterministic).

x_bias is the bias of the product x comes from (out_proj, the FFN's w_2), added here
rather than by the product: its gradient is the column sum of x's gradient, which the
backward kernel adds up as it writes that gradient, instead of a separate reduction
reading it again (~40 us a layer in fp32 at the ML-1M step's shape on an H200).

Only the row statistics (mean, 1/std) are stored; the backward pass recomputes h from x
and the residual, and the dropout mask from the call's seed (Philox, four draws per call
with `tl.rand4x`; the seed comes from PyTorch's CUDA generator, so CUDA graphs replay fresh
masks). Float32 arithmetic for any input dtype. The masks differ from nn.Dropout's draws;
the function is the same.

`models.layers.dropout_add_layer_norm` dispatches here on the Triton backend and to
nn.functional otherwise; tests/test_layer_norm.py compares the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.triton_dropout import check_elements, dropout_seed
from models.triton_launch import COMPILE_OPTIONS
from models.triton_vectors import as_rows, optional_vector, row_sums

QUARTER_ELEMENTS = 2048  # rows x BLOCK_N of each of a program's four row blocks; the
# dropout draws are numbered by it, so forward and backward share it

# Warps per kernel. `python -m benchmarks.norm_kernels --sweep` times the alternatives.
LAUNCH_OPTIONS: dict[str, dict] = {
    "_dropout_add_layer_norm_fwd": dict(num_warps=4),
    "_dropout_add_layer_norm_bwd": dict(num_warps=4),
}


@triton.jit
def _draws(
    seed_ptr, pid, cols, QROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr
):
    """Uniform draws for the program's four row blocks, four per Philox call (`tl.rand4x`):
    a draw per element would cost more than the memory traffic."""
    if HAS_DROPOUT:
        counters = (pid * QROWS + tl.arange(0, QROWS))[:, None] * BLOCK_N + cols[None, :]
        r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr).to(tl.uint32), counters)
    else:
        ones = tl.full([QROWS, BLOCK_N], 1.0, tl.float32)
        r0, r1, r2, r3 = ones, ones, ones, ones
    return r0, r1, r2, r3


@triton.jit
def _dropped_sum(
    x_ptr, res_ptr, xb, r64, cols, mask, draw, s_x, s_res, p,
    HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):  # fmt: skip
    """h = Dropout_p(x + x_bias) + residual for a block of rows (r64: row indices, int64;
    xb: x_bias, zeros without one), float32."""
    h = tl.load(x_ptr + r64 * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h += xb[None, :]
    if HAS_DROPOUT:
        h = tl.where(draw >= p, h / (1.0 - p), 0.0)
    if HAS_RES:
        h += tl.load(res_ptr + r64 * s_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _fwd_rows(
    x_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, rows, cols, w, b, xb, draw,
    M, N, s_x, s_res, s_y, eps, p,
    HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):  # fmt: skip
    mask_m = rows < M
    mask = mask_m[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]  # addresses in int64: M x N may pass 2**31
    h = _dropped_sum(x_ptr, res_ptr, xb, r64, cols, mask, draw, s_x, s_res, p, HAS_RES, HAS_DROPOUT)
    mean = tl.sum(h, axis=1) / N
    centred = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + r64 * s_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=mask_m)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)


@triton.jit
def _dropout_add_layer_norm_fwd(
    x_ptr, res_ptr, xb_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, seed_ptr,
    M, N, s_x, s_res, s_y, eps, p,
    HAS_RES: tl.constexpr, HAS_XBIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    QROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * 4 * QROWS + tl.arange(0, QROWS)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    xb = optional_vector(xb_ptr, cols, cols < N, HAS_XBIAS)
    r0, r1, r2, r3 = _draws(seed_ptr, pid, cols, QROWS, BLOCK_N, HAS_DROPOUT)
    # four calls spelled out: constexprs packed into a tuple would stop being constexprs
    _fwd_rows(
        x_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, rows, cols, w, b, xb, r0,
        M, N, s_x, s_res, s_y, eps, p, HAS_RES, HAS_DROPOUT,
    )  # fmt: skip
    _fwd_rows(
        x_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, rows + QROWS, cols, w, b, xb, r1,
        M, N, s_x, s_res, s_y, eps, p, HAS_RES, HAS_DROPOUT,
    )  # fmt: skip
    _fwd_rows(
        x_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, rows + 2 * QROWS, cols, w, b, xb, r2,
        M, N, s_x, s_res, s_y, eps, p, HAS_RES, HAS_DROPOUT,
    )  # fmt: skip
    _fwd_rows(
        x_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, rows + 3 * QROWS, cols, w, b, xb, r3,
        M, N, s_x, s_res, s_y, eps, p, HAS_RES, HAS_DROPOUT,
    )  # fmt: skip


@triton.jit
def _bwd_rows(
    x_ptr, res_ptr, dy_ptr, dx_ptr, dres_ptr, mean_ptr, rstd_ptr, rows, cols, w, xb, draw,
    M, N, s_x, s_res, s_dy, s_dx, s_dres, p,
    HAS_RES: tl.constexpr, STORE_DRES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):  # fmt: skip
    """Input gradients of a block of rows; returns its weight, bias and x_bias gradient
    sums."""
    mask_m = rows < M
    mask = mask_m[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h = _dropped_sum(x_ptr, res_ptr, xb, r64, cols, mask, draw, s_x, s_res, p, HAS_RES, HAS_DROPOUT)
    mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
    x_hat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(dy_ptr + r64 * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # d/dh of the normalisation: (g - mean(g) - x_hat mean(g x_hat)) / std, g = dy * w
    g = dy * w[None, :]
    mean_g = tl.sum(g, axis=1) / N
    mean_g_xhat = tl.sum(g * x_hat, axis=1) / N
    dh = tl.where(mask, (g - mean_g[:, None] - x_hat * mean_g_xhat[:, None]) * rstd[:, None], 0.0)
    if STORE_DRES:
        dres = dh.to(dres_ptr.dtype.element_ty)
        tl.store(dres_ptr + r64 * s_dres + cols[None, :], dres, mask=mask)
    dx = dh
    if HAS_DROPOUT:
        dx = tl.where(draw >= p, dh / (1.0 - p), 0.0)
    tl.store(dx_ptr + r64 * s_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(dy * x_hat, axis=0), tl.sum(dy, axis=0), tl.sum(dx, axis=0)


@triton.jit
def _dropout_add_layer_norm_bwd(
    x_ptr, res_ptr, xb_ptr, w_ptr, dy_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr, dxb_ptr,
    mean_ptr, rstd_ptr, seed_ptr,
    M, N, s_x, s_res, s_dy, s_dx, s_dres, p,
    HAS_RES: tl.constexpr, STORE_DRES: tl.constexpr, HAS_XBIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, QROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * 4 * QROWS + tl.arange(0, QROWS)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    xb = optional_vector(xb_ptr, cols, cols < N, HAS_XBIAS)
    r0, r1, r2, r3 = _draws(seed_ptr, pid, cols, QROWS, BLOCK_N, HAS_DROPOUT)
    # four calls spelled out: constexprs packed into a tuple would stop being constexprs
    dw, db, dxb = _bwd_rows(
        x_ptr, res_ptr, dy_ptr, dx_ptr, dres_ptr, mean_ptr, rstd_ptr, rows, cols, w, xb, r0,
        M, N, s_x, s_res, s_dy, s_dx, s_dres, p, HAS_RES, STORE_DRES, HAS_DROPOUT,
    )  # fmt: skip
    dw1, db1, dxb1 = _bwd_rows(
        x_ptr, res_ptr, dy_ptr, dx_ptr, dres_ptr, mean_ptr, rstd_ptr, rows + QROWS, cols, w,
        xb, r1, M, N, s_x, s_res, s_dy, s_dx, s_dres, p, HAS_RES, STORE_DRES, HAS_DROPOUT,
    )  # fmt: skip
    dw2, db2, dxb2 = _bwd_rows(
        x_ptr, res_ptr, dy_ptr, dx_ptr, dres_ptr, mean_ptr, rstd_ptr, rows + 2 * QROWS, cols, w,
        xb, r2, M, N, s_x, s_res, s_dy, s_dx, s_dres, p, HAS_RES, STORE_DRES, HAS_DROPOUT,
    )  # fmt: skip
    dw3, db3, dxb3 = _bwd_rows(
        x_ptr, res_ptr, dy_ptr, dx_ptr, dres_ptr, mean_ptr, rstd_ptr, rows + 3 * QROWS, cols, w,
        xb, r3, M, N, s_x, s_res, s_dy, s_dx, s_dres, p, HAS_RES, STORE_DRES, HAS_DROPOUT,
    )  # fmt: skip
    # transposed, (N, tiles): PyTorch adds up rows much faster than columns
    tiles = tl.num_programs(0)
    tl.store(dw_ptr + cols * tiles + pid, dw + dw1 + dw2 + dw3, mask=cols < N)
    tl.store(db_ptr + cols * tiles + pid, db + db1 + db2 + db3, mask=cols < N)
    if HAS_XBIAS:
        tl.store(dxb_ptr + cols * tiles + pid, dxb + dxb1 + dxb2 + dxb3, mask=cols < N)


def _blocks(n: int) -> tuple[int, int]:
    """Rows per row block (a program has four) and the padded row length."""
    block_n = triton.next_power_of_2(n)
    return max(1, QUARTER_ELEMENTS // block_n), block_n


class DropoutAddLayerNorm(torch.autograd.Function):
    """LayerNorm(Dropout_p(x + x_bias) + residual) with weight and bias; `residual` and
    `x_bias` may be None. Output float32 under autocast (as nn.LayerNorm's), else the
    inputs' promoted dtype."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, p: float, x_bias=None):
        shape, N = x.shape, x.shape[-1]
        x2 = as_rows(x)  # (M, N)
        res2 = None if residual is None else as_rows(residual)
        M = x2.shape[0]
        check_elements(M * N, "dropout_add_layer_norm")
        if residual is not None and res2.shape != x2.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(shape)}")
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.float32
        else:
            out_dtype = (
                x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
            )
        y = torch.empty((M, N), device=x.device, dtype=out_dtype)
        mean = torch.empty(M, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        seed = dropout_seed(p, x.device)
        qrows, block_n = _blocks(N)
        _dropout_add_layer_norm_fwd[(triton.cdiv(M, 4 * qrows),)](
            x2, res2, x_bias, weight, bias, y, mean, rstd, seed,
            M, N, x2.stride(0), 0 if res2 is None else res2.stride(0), y.stride(0), eps, p,
            HAS_RES=res2 is not None, HAS_XBIAS=x_bias is not None, HAS_DROPOUT=p > 0,
            QROWS=qrows, BLOCK_N=block_n,
            **LAUNCH_OPTIONS["_dropout_add_layer_norm_fwd"], **COMPILE_OPTIONS,
        )  # fmt: skip
        ctx.save_for_backward(x2, res2, x_bias, weight, mean, rstd, seed)
        ctx.shape, ctx.p, ctx.qrows = shape, p, qrows
        ctx.dtypes = (bias.dtype, None if residual is None else residual.dtype)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, res2, x_bias, weight, mean, rstd, seed = ctx.saved_tensors
        bias_dtype, res_dtype = ctx.dtypes
        M, N = x2.shape
        dy2 = as_rows(dy)
        dx = torch.empty_like(x2)
        store_dres = res2 is not None and ctx.needs_input_grad[1]
        dres = torch.empty((M, N), device=x2.device, dtype=res_dtype) if store_dres else None
        qrows, block_n = ctx.qrows, _blocks(N)[1]  # the forward's rows: its dropout draws
        tiles = triton.cdiv(M, 4 * qrows)
        # per-program sums of the weight, bias and x_bias gradients: one reduction for all
        partials = torch.empty(
            (3 if x_bias is not None else 2, N, tiles), device=x2.device, dtype=torch.float32
        )
        _dropout_add_layer_norm_bwd[(tiles,)](
            x2, res2, x_bias, weight, dy2, dx, dres, partials[0], partials[1], partials[-1],
            mean, rstd, seed,
            M, N, x2.stride(0), 0 if res2 is None else res2.stride(0), dy2.stride(0),
            dx.stride(0), dres.stride(0) if store_dres else 0, ctx.p,
            HAS_RES=res2 is not None, STORE_DRES=store_dres, HAS_XBIAS=x_bias is not None,
            HAS_DROPOUT=ctx.p > 0, QROWS=qrows, BLOCK_N=block_n,
            **LAUNCH_OPTIONS["_dropout_add_layer_norm_bwd"], **COMPILE_OPTIONS,
        )  # fmt: skip
        sums = row_sums(partials)  # (2 or 3, N)
        dweight = sums[0].to(weight.dtype)
        dbias = sums[1].to(bias_dtype)
        dx_bias = sums[2].to(x_bias.dtype) if x_bias is not None else None
        dres = dres.view(ctx.shape) if store_dres else None
        return dx.view(ctx.shape), dres, dweight, dbias, None, None, dx_bias
