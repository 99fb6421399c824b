"""Causal depthwise convolution along L fused with its Hardswish, as Triton kernels.

    y[b, l, c] = hardswish(bias[c] + sum_k w[c, k] x'[b, l - (K - 1) + k, c]),
    x' = x + x_bias (zero before the sequence starts)

TiSSDBlock convolves xBC (B, L, C) and its time signal this way. Through nn.Conv1d each
costs a transposed copy, the padded convolution, a slice and the activation forward, and
as many kernels backward (PyTorch's depthwise kernels alone: ~1.9 ms of a 17 ms training
step at the ML-1M shape on an H200, docs/performance_notes.md). Here one kernel each way,
both walking the rows of a sequence segment with the previous K - 1 rows in registers.
Backward recomputes the pre-activation, forms g = dy * hardswish'(pre) row by row and
writes dx[l] = sum_k w[k] g[l + K - 1 - k] three rows behind, so g never goes to memory;
the weight's and biases' gradients are summed per segment, then added up by PyTorch
(deterministic). Inputs in any strides (xBC is a column slice of in_proj's output);
float32 arithmetic. x_bias (optional) is the bias of the product x comes from (in_proj's
xBC columns), added here: its gradient is the column sum of dx. Kernels up to TAPS wide.

`ssd.causal_conv1d_hardswish` dispatches here on CUDA and to the nn.functional reference
otherwise; tests/test_causal_conv.py compares the two (CUDA, and Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.split_gradient import gradient_buffer
from models.triton_launch import COMPILE_OPTIONS
from models.triton_vectors import optional_vector, row_sums

TAPS = tl.constexpr(4)  # the widest kernel the Triton path takes (as mamba-ssm's causal_conv1d)

# Each program walks the rows of one sequence segment (at most SEGMENT rows, segments of a
# sequence balanced) for BLOCK_C channels, one row of channels at a time: the K - 1
# previous rows stay in registers, so each input row is read once, and the backward
# pass's weight and bias sums stay per thread until the segment ends. UNROLL rows per
# loop step keep that many rows' loads in flight. Chosen by `python -m
# benchmarks.ssd_kernels --sweep --ops "conv,time conv"` on an H200 (20 geometries for
# xBC, 8 for the time path; docs/performance_notes.md, "Convolution along rows").
LAUNCH_OPTIONS: dict[str, dict] = {
    "_causal_conv_fwd": dict(BLOCK_C=128, SEGMENT=32, UNROLL=4, num_warps=2),
    "_causal_conv_bwd": dict(BLOCK_C=64, SEGMENT=64, UNROLL=4, num_warps=1),
}


@triton.jit
def hardswish(v):
    return v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def hardswish_grad(v):  # PyTorch's: 0 up to -3 (inclusive), v / 3 + 1/2 below 3, then 1
    return tl.where(v <= -3.0, 0.0, tl.where(v < 3.0, v / 3.0 + 0.5, 1.0))


@triton.jit
def _tap(w_ptr, offs_c, mask_c, j: tl.constexpr, K: tl.constexpr):
    """Weight j of TAPS for a K-wide kernel: the first TAPS - K are zero (a K-wide causal
    kernel is a TAPS-wide one that ignores the oldest TAPS - K rows)."""
    k = j - (TAPS - K)
    return tl.load(w_ptr + offs_c * K + k, mask=mask_c & (k >= 0), other=0.0).to(tl.float32)


@triton.jit
def _row(base, row, L, s_l, offs_c, s_c, mask_c, xb, HAS_XBIAS: tl.constexpr):
    """Row `row` of a (L, C) tensor at `base` for the tile's channels, float32, plus `xb`
    when HAS_XBIAS; zero outside 0 <= row < L."""
    valid = (row >= 0) & (row < L)
    v = tl.load(base + row * s_l + offs_c * s_c, mask=mask_c & valid, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        v = tl.where(valid, v + xb, 0.0)
    return v


@triton.jit
def _causal_conv_fwd(
    x_ptr, w_ptr, b_ptr, xb_ptr, y_ptr,
    L, C, rows,
    s_x_b, s_x_l, s_x_c,
    s_y_b, s_y_l, s_y_c,
    K: tl.constexpr, HAS_XBIAS: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """y = hardswish(conv) for rows [l0, l1) of one sequence."""
    b = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1) * rows
    l1 = tl.minimum(l0 + rows, L)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    xb = optional_vector(xb_ptr, offs_c, mask_c, HAS_XBIAS)
    w0, w1 = _tap(w_ptr, offs_c, mask_c, 0, K), _tap(w_ptr, offs_c, mask_c, 1, K)
    w2, w3 = _tap(w_ptr, offs_c, mask_c, 2, K), _tap(w_ptr, offs_c, mask_c, 3, K)
    bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x_base, y_base = x_ptr + b * s_x_b, y_ptr + b * s_y_b
    # x3, x2, x1, x0: rows l - 3 .. l
    x3 = _row(x_base, l0 - 3, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
    x2 = _row(x_base, l0 - 2, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
    x1 = _row(x_base, l0 - 1, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
    for start in range(l0, l1, UNROLL):
        for i in tl.static_range(UNROLL):
            row = start + i
            x0 = _row(x_base, row, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
            pre = bias + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0
            y = hardswish(pre).to(y_ptr.dtype.element_ty)
            tl.store(y_base + row * s_y_l + offs_c * s_y_c, y, mask=mask_c & (row < l1))
            x3, x2, x1 = x2, x1, x0


@triton.jit
def _causal_conv_bwd(
    x_ptr, w_ptr, b_ptr, xb_ptr, dy_ptr, dx_ptr, partials_ptr,
    L, C, rows,
    s_x_b, s_x_l, s_x_c,
    s_dy_b, s_dy_l, s_dy_c,
    s_dx_b, s_dx_l, s_dx_c,
    K: tl.constexpr, HAS_XBIAS: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """For rows [l0, l1) of one sequence: g = dy * hardswish'(pre) (pre recomputed), then
    dx[m] = sum_j w_j g[m + 3 - j], which needs g three rows past l1 (recomputed here too,
    not summed); the segment's sums of g x[l - 3 + j] (the weight's gradient), of g (the
    bias's) and of dx (x_bias's) go to `partials` (K + 1 + HAS_XBIAS, C, segments),
    added up by PyTorch: deterministic."""
    b = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1) * rows
    l1 = tl.minimum(l0 + rows, L)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    xb = optional_vector(xb_ptr, offs_c, mask_c, HAS_XBIAS)
    w0, w1 = _tap(w_ptr, offs_c, mask_c, 0, K), _tap(w_ptr, offs_c, mask_c, 1, K)
    w2, w3 = _tap(w_ptr, offs_c, mask_c, 2, K), _tap(w_ptr, offs_c, mask_c, 3, K)
    bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x_base, dy_base, dx_base = x_ptr + b * s_x_b, dy_ptr + b * s_dy_b, dx_ptr + b * s_dx_b
    x3 = _row(x_base, l0 - 3, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
    x2 = _row(x_base, l0 - 2, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
    x1 = _row(x_base, l0 - 1, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
    zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
    g1, g2, g3 = zero, zero, zero  # g at l - 1 .. l - 3 (before l0: only feeds dx < l0)
    dw0, dw1, dw2, dw3, dbias, dxbias = zero, zero, zero, zero, zero, zero
    for start in range(l0, l1 + 3, UNROLL):
        for i in tl.static_range(UNROLL):
            row = start + i
            x0 = _row(x_base, row, L, s_x_l, offs_c, s_x_c, mask_c, xb, HAS_XBIAS)
            dy = _row(dy_base, row, L, s_dy_l, offs_c, s_dy_c, mask_c, xb, False)
            g0 = dy * hardswish_grad(bias + w0 * x3 + w1 * x2 + w2 * x1 + w3 * x0)
            own = row < l1  # rows past l1 belong to the next segment's sums
            dbias += tl.where(own, g0, 0.0)
            dw0 += tl.where(own, g0 * x3, 0.0)
            dw1 += tl.where(own, g0 * x2, 0.0)
            dw2 += tl.where(own, g0 * x1, 0.0)
            dw3 += tl.where(own, g0 * x0, 0.0)
            m = row - 3
            emit = (m >= l0) & (m < l1)
            dx = w0 * g0 + w1 * g1 + w2 * g2 + w3 * g3
            tl.store(
                dx_base + m * s_dx_l + offs_c * s_dx_c,
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask_c & emit,
            )
            if HAS_XBIAS:
                dxbias += tl.where(emit, dx, 0.0)
            x3, x2, x1 = x2, x1, x0
            g3, g2, g1 = g2, g1, g0
    segments = tl.num_programs(0).to(tl.int64) * tl.num_programs(1)  # int64: C x B x ...
    out = partials_ptr + offs_c * segments + b * tl.num_programs(1) + tl.program_id(1)
    step = C * segments  # one (C, segments) plane per sum: dw rows 0..K-1, db, dx_bias
    if K >= 4:
        tl.store(out + (K - 4) * step, dw0, mask=mask_c)
    if K >= 3:
        tl.store(out + (K - 3) * step, dw1, mask=mask_c)
    if K >= 2:
        tl.store(out + (K - 2) * step, dw2, mask=mask_c)
    tl.store(out + (K - 1) * step, dw3, mask=mask_c)
    tl.store(out + K * step, dbias, mask=mask_c)
    if HAS_XBIAS:
        tl.store(out + (K + 1) * step, dxbias, mask=mask_c)


def launch(kernel: str, batch: int, length: int, channels: int) -> tuple[tuple, dict, int]:
    """(grid, launch options, rows per program) of `kernel` from LAUNCH_OPTIONS: segments
    of at most SEGMENT rows, balanced; BLOCK_C shrinks to the channels (a power of two)
    when there are fewer (the time path's 4), and the warps to one per 32 channels."""
    options = dict(LAUNCH_OPTIONS[kernel])
    segments = triton.cdiv(length, options.pop("SEGMENT"))
    rows = triton.cdiv(length, segments)
    options["BLOCK_C"] = min(options["BLOCK_C"], triton.next_power_of_2(channels))
    options["num_warps"] = max(1, min(options["num_warps"], options["BLOCK_C"] // 32))
    grid = (batch, triton.cdiv(length, rows), triton.cdiv(channels, options["BLOCK_C"]))
    return grid, options, rows


class CausalConvHardswish(torch.autograd.Function):
    """hardswish(causal depthwise conv of x + x_bias (B, L, C) along L), weight (C, 1, K)
    with K <= TAPS, bias (C,); `x_bias` (C,) may be None. `dx_into` (optional, called in
    backward) gives the tensor to write x's gradient into, e.g. a view into the gradient
    of the product x is a slice of (models/split_gradient.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_bias=None, dx_into=None) -> torch.Tensor:
        batch, length, channels = x.shape
        K = weight.shape[-1]
        if K > TAPS.value:
            raise ValueError(
                f"the Triton causal convolution takes kernels of at most {TAPS.value} taps, got "
                f"{K}: use causal_conv1d_hardswish, which falls back to nn.functional"
            )
        weight, bias = weight.reshape(channels, K).contiguous(), bias.contiguous()
        y = torch.empty_like(x)  # x's memory order when it is dense, else contiguous
        grid, options, rows = launch("_causal_conv_fwd", batch, length, channels)
        _causal_conv_fwd[grid](
            x, weight, bias, x_bias, y, length, channels, rows, *x.stride(), *y.stride(),
            K=K, HAS_XBIAS=x_bias is not None, **options, **COMPILE_OPTIONS,
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
        grid, options, rows = launch("_causal_conv_bwd", batch, length, channels)
        # per-segment sums of the weight's (K rows), the bias's and x_bias's gradients
        partials = torch.empty(
            K + 1 + has_x_bias, channels, grid[0] * grid[1], device=x.device, dtype=torch.float32
        )
        dx = gradient_buffer(ctx.dx_into, x)
        _causal_conv_bwd[grid](
            x, weight, bias, x_bias, dy, dx, partials, length, channels, rows,
            *x.stride(), *dy.stride(), *dx.stride(),
            K=K, HAS_XBIAS=has_x_bias, **options, **COMPILE_OPTIONS,
        )  # fmt: skip
        sums = row_sums(partials)  # (K + 1 + has_x_bias, C)
        dx_bias = sums[K + 1] if has_x_bias else None
        return dx, sums[:K].T.reshape(channels, 1, K), sums[K], dx_bias, None
