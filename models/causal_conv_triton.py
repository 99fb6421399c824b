"""Causal depthwise convolution along L fused with its Hardswish, as Triton kernels.

    y[b, l, c] = hardswish(bias[c] + sum_k w[c, k] x'[b, l - (K - 1) + k, c]),
    x' = x + x_bias (zero before the sequence starts)

TiSSDBlock convolves xBC (B, L, C) and its time signal this way. Through nn.Conv1d each
costs a transposed copy, the padded convolution, a slice and the activation forward, and
as many kernels backward (PyTorch's depthwise kernels alone: ~1.9 ms of a 17 ms training
step at the ML-1M shape on an H200, docs/performance_notes.md). Here: one kernel forward;
backward one kernel for the activation's gradient g with the weight and bias partial sums
(per block of rows, added up by PyTorch: deterministic), and one for the input gradient
dx[l] = sum_k w[k] g[l + K - 1 - k]. The pre-activation is recomputed, not stored.
Inputs in any strides (xBC is a column slice of in_proj's output); float32 arithmetic.
x_bias (optional) is the bias of the product x comes from (in_proj's xBC columns), added
here: its gradient, the column sum of dx, is summed per tile by the input-gradient kernel.

`ssd.causal_conv1d_hardswish` dispatches here on CUDA and to the nn.functional reference
otherwise; tests/test_causal_conv.py compares the two (CUDA, and Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.split_gradient import gradient_buffer
from models.triton_vectors import optional_vector

# Tiles of (BLOCK_L rows, up to BLOCK_C channels) and warps per kernel. The two backward
# kernels share one tile geometry (their per-tile partial sums go into one buffer), so
# `_causal_conv_bwd_dx` takes BLOCK_L and BLOCK_C from `_causal_conv_bwd_g`'s entry.
# `python -m benchmarks.ssd_kernels --sweep --ops conv` times the alternatives: 64 x 64
# at 4 warps was the fastest of 12 for xBC on an H200, though ptxas reports spills at it
# (docs/performance_notes.md, "Convolution launch options").
LAUNCH_OPTIONS: dict[str, dict] = {
    "_causal_conv_fwd": dict(BLOCK_L=64, BLOCK_C=64, num_warps=4),
    "_causal_conv_bwd_g": dict(BLOCK_L=64, BLOCK_C=64, num_warps=4),
    "_causal_conv_bwd_dx": dict(num_warps=4),
}


@triton.jit
def hardswish(v):
    return v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def hardswish_grad(v):  # PyTorch's: 0 up to -3 (inclusive), v / 3 + 1/2 below 3, then 1
    return tl.where(v <= -3.0, 0.0, tl.where(v < 3.0, v / 3.0 + 0.5, 1.0))


@triton.jit
def _shifted_input(
    x_base, xb, offs_l, offs_c, mask_c, L, s_x_l, s_x_c,
    k: tl.constexpr, K: tl.constexpr, HAS_XBIAS: tl.constexpr,
):  # fmt: skip
    """x'[l - (K-1) + k] = x + x_bias for a tile, zero before the start, float32."""
    src = offs_l - (K - 1) + k
    valid = ((src >= 0) & (src < L))[:, None] & mask_c[None, :]
    x = tl.load(x_base + src[:, None] * s_x_l + offs_c[None, :] * s_x_c, mask=valid, other=0.0)
    x = x.to(tl.float32)
    if HAS_XBIAS:
        x = tl.where(valid, x + xb[None, :], 0.0)
    return x


@triton.jit
def _conv_tile(
    x_base, w_ptr, b_ptr, xb, offs_l, offs_c, mask_c, L, s_x_l, s_x_c,
    K: tl.constexpr, HAS_XBIAS: tl.constexpr,
):  # fmt: skip
    """bias + sum_k w[:, k] x'[l - (K-1) + k] for a (BLOCK_L, BLOCK_C) tile, float32."""
    acc = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        x = _shifted_input(x_base, xb, offs_l, offs_c, mask_c, L, s_x_l, s_x_c, k, K, HAS_XBIAS)
        w = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return acc


@triton.jit
def _causal_conv_fwd(
    x_ptr, w_ptr, b_ptr, xb_ptr, y_ptr,
    L, C,
    s_x_b, s_x_l, s_x_c,
    s_y_b, s_y_l, s_y_c,
    K: tl.constexpr, HAS_XBIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    xb = optional_vector(xb_ptr, offs_c, mask_c, HAS_XBIAS)
    pre = _conv_tile(
        x_ptr + b * s_x_b, w_ptr, b_ptr, xb, offs_l, offs_c, mask_c, L, s_x_l, s_x_c, K, HAS_XBIAS
    )
    out = y_ptr + b * s_y_b + offs_l[:, None] * s_y_l + offs_c[None, :] * s_y_c
    tl.store(out, hardswish(pre), mask=(offs_l < L)[:, None] & mask_c[None, :])


@triton.jit
def _causal_conv_bwd_g(
    x_ptr, w_ptr, b_ptr, xb_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr,
    L, C,
    s_x_b, s_x_l, s_x_c,
    s_dy_b, s_dy_l, s_dy_c,
    K: tl.constexpr, HAS_XBIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """g = dy * hardswish'(pre) (float32, (B, L, C) contiguous); this tile's sums of
    g * x'[l - (K-1) + k] (dw partial, (K, C, n_tiles)) and of g (db partial, (C, n_tiles)),
    transposed: PyTorch adds up rows much faster than columns."""
    b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    rows = (offs_l < L)[:, None] & mask_c[None, :]
    x_base = x_ptr + b * s_x_b
    xb = optional_vector(xb_ptr, offs_c, mask_c, HAS_XBIAS)
    pre = _conv_tile(
        x_base, w_ptr, b_ptr, xb, offs_l, offs_c, mask_c, L, s_x_l, s_x_c, K, HAS_XBIAS
    )
    dy = tl.load(
        dy_ptr + b * s_dy_b + offs_l[:, None] * s_dy_l + offs_c[None, :] * s_dy_c,
        mask=rows,
        other=0.0,
    ).to(tl.float32)
    g = tl.where(rows, dy * hardswish_grad(pre), 0.0)
    tl.store(g_ptr + (b * L + offs_l[:, None]) * C + offs_c[None, :], g, mask=rows)
    tile = b * tl.num_programs(1) + pid_l
    tiles = tl.num_programs(0) * tl.num_programs(1)
    tl.store(db_ptr + offs_c * tiles + tile, tl.sum(g, axis=0), mask=mask_c)
    for k in tl.static_range(K):
        x = _shifted_input(x_base, xb, offs_l, offs_c, mask_c, L, s_x_l, s_x_c, k, K, HAS_XBIAS)
        tl.store(dw_ptr + (k * C + offs_c) * tiles + tile, tl.sum(g * x, axis=0), mask=mask_c)


@triton.jit
def _causal_conv_bwd_dx(
    g_ptr, w_ptr, dx_ptr, dxb_ptr,
    L, C,
    s_dx_b, s_dx_l, s_dx_c,
    K: tl.constexpr, HAS_XBIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx[l] = sum_k w[:, k] g[l + K - 1 - k] (the convolution's transpose); with x_bias,
    this tile's sum of dx (x_bias's gradient partial, (C, n_tiles), transposed)."""
    b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        dst = offs_l + (K - 1) - k
        valid = (dst < L)[:, None] & mask_c[None, :]
        g = tl.load(g_ptr + (b * L + dst[:, None]) * C + offs_c[None, :], mask=valid, other=0.0)
        w = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        acc += g * w[None, :]
    out = dx_ptr + b * s_dx_b + offs_l[:, None] * s_dx_l + offs_c[None, :] * s_dx_c
    tl.store(out, acc, mask=(offs_l < L)[:, None] & mask_c[None, :])
    if HAS_XBIAS:  # acc is zero past L (g loads as 0 there)
        tiles = tl.num_programs(0) * tl.num_programs(1)
        tl.store(
            dxb_ptr + offs_c * tiles + b * tl.num_programs(1) + pid_l,
            tl.sum(acc, axis=0),
            mask=mask_c,
        )


def launch(kernel: str, batch: int, length: int, channels: int) -> tuple[tuple, dict]:
    """(grid, launch options) of `kernel` from LAUNCH_OPTIONS: BLOCK_C shrinks to the
    channels (a power of two) when there are fewer (the time path's 4)."""
    tiles = LAUNCH_OPTIONS["_causal_conv_bwd_g" if kernel == "_causal_conv_bwd_dx" else kernel]
    block_l = tiles["BLOCK_L"]
    block_c = min(tiles["BLOCK_C"], triton.next_power_of_2(channels))
    grid = (batch, triton.cdiv(length, block_l), triton.cdiv(channels, block_c))
    return grid, dict(
        BLOCK_L=block_l, BLOCK_C=block_c, num_warps=LAUNCH_OPTIONS[kernel]["num_warps"]
    )


class CausalConvHardswish(torch.autograd.Function):
    """hardswish(causal depthwise conv of x + x_bias (B, L, C) along L), weight (C, 1, K),
    bias (C,); `x_bias` (C,) may be None. `dx_into` (optional, called in backward) gives
    the tensor to write x's gradient into, e.g. a view into the gradient of the product x
    is a slice of (models/split_gradient.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_bias=None, dx_into=None) -> torch.Tensor:
        batch, length, channels = x.shape
        K = weight.shape[-1]
        weight, bias = weight.reshape(channels, K).contiguous(), bias.contiguous()
        y = torch.empty_like(x)  # x's memory order when it is dense, else contiguous
        grid, options = launch("_causal_conv_fwd", batch, length, channels)
        _causal_conv_fwd[grid](
            x, weight, bias, x_bias, y, length, channels, *x.stride(), *y.stride(),
            K=K, HAS_XBIAS=x_bias is not None, **options,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, x_bias)
        ctx.dx_into = dx_into
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias, x_bias = ctx.saved_tensors
        batch, length, channels = x.shape
        K = weight.shape[-1]
        has_x_bias = x_bias is not None
        grid, options_g = launch("_causal_conv_bwd_g", batch, length, channels)
        _, options_dx = launch("_causal_conv_bwd_dx", batch, length, channels)
        tiles = grid[0] * grid[1]
        g = torch.empty(batch, length, channels, device=x.device, dtype=torch.float32)
        # per-tile sums of the weight's (K rows), the bias's and x_bias's gradients
        partials = torch.empty(
            K + 1 + has_x_bias, channels, tiles, device=x.device, dtype=torch.float32
        )
        _causal_conv_bwd_g[grid](
            x, weight, bias, x_bias, dy, g, partials[:K], partials[K],
            length, channels, *x.stride(), *dy.stride(),
            K=K, HAS_XBIAS=has_x_bias, **options_g,
        )  # fmt: skip
        dx = gradient_buffer(ctx.dx_into, x)
        _causal_conv_bwd_dx[grid](
            g, weight, dx, partials[-1], length, channels, *dx.stride(),
            K=K, HAS_XBIAS=has_x_bias, **options_dx,
        )  # fmt: skip
        sums = partials.sum(-1)  # (K + 1 + has_x_bias, C)
        dx_bias = sums[K + 1] if has_x_bias else None
        return dx, sums[:K].T.reshape(channels, 1, K), sums[K], dx_bias, None
