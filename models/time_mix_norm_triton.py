"""The end of TiM4Rec's time path, norm(s T + (1 - s) theta), fused, as Triton kernels.

    s = sigmoid(gate_logits)                 per position (B, H, L) or per row (B, H, 1)
    x = s * T + (1 - s) * theta              T, theta: (B, H, L)
    y = (x - mean) / sqrt(var + eps) * weight + bias      along L

The statistics are either the whole row's (nn.LayerNorm(L), the paper's time path) or,
with PREFIX, position i's over positions 0..i only (models.layers.PrefixLayerNorm, the
causal time path): mean_i = S1_i / n_i, var_i = max(S2_i / n_i - mean_i^2, 0), with S1,
S2 the running sums of x and x^2 and n_i = i + 1.

In PyTorch the gate, the mix and the prefix norm are ~20 elementwise and scan kernels
forward and ~45 backward per layer, each over the whole (B, H, L) signal (2 MB at the
ML-1M step's shape). Here a program holds ROWS rows of L: one kernel forward, one backward
that recomputes x and the statistics from the inputs (nothing saved but the inputs) and
writes the gradients of gate_logits, T and theta, with per-program sums of the weight and
bias gradients that PyTorch adds up (deterministic).

Prefix backward, with g_i = dy_i * weight_i, xhat_i = (x_i - mean_i) r_i, r_i = (var_i +
eps)^-1/2:
    dvar_i  = -1/2 g_i (x_i - mean_i) r_i^3            (0 where var_i was clamped)
    a_i     = (-g_i r_i - 2 mean_i dvar_i) / n_i        (through S1)
    c_i     = dvar_i / n_i                               (through S2)
    dx_j    = g_j r_j + sum_{i >= j} a_i + 2 x_j sum_{i >= j} c_i
the two sums being reversed running sums along the row.

`models.layers.time_mix_norm` dispatches here on the Triton backend and to PyTorch
otherwise; tests/test_time_mix_norm.py compares both with float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.triton_launch import COMPILE_OPTIONS
from models.triton_vectors import row_sums

# Rows per program and warps per kernel. `python -m benchmarks.norm_kernels --sweep`
# times the alternatives.
LAUNCH_OPTIONS: dict[str, dict] = {
    "_time_mix_norm_fwd": dict(ROWS=4, num_warps=4),
    "_time_mix_norm_bwd": dict(ROWS=4, num_warps=4),
}


@triton.jit
def _mix(
    gate_ptr, t_ptr, theta_ptr, rows, cols, mask, M, H, L, s_tb, s_th, s_tl,
    GATE_PER_ROW: tl.constexpr,
):  # fmt: skip
    """s, T, theta and x = s T + (1 - s) theta for a block of rows, float32; theta read
    through its strides (the block passes a transposed view)."""
    r64 = rows.to(tl.int64)  # addresses in int64
    if GATE_PER_ROW:
        logits = tl.load(gate_ptr + r64, mask=rows < M, other=0.0).to(tl.float32)[:, None]
    else:
        logits = tl.load(gate_ptr + r64[:, None] * L + cols[None, :], mask=mask, other=0.0)
        logits = logits.to(tl.float32)
    s = tl.sigmoid(logits)
    t = tl.load(t_ptr + r64[:, None] * L + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    theta_rows = (r64 // H) * s_tb + (r64 % H) * s_th
    theta_offs = theta_rows[:, None] + cols[None, :].to(tl.int64) * s_tl
    theta = tl.load(theta_ptr + theta_offs, mask=mask, other=0.0).to(tl.float32)
    return s, t, theta, theta_offs, s * t + (1.0 - s) * theta


@triton.jit
def _statistics(x, cols, mask, L, eps, PREFIX: tl.constexpr):
    """mean and 1/std of x along its rows: per position over 0..i with PREFIX, else one
    pair per row (broadcast along the row); plus the clamp's mask (var >= 0)."""
    if PREFIX:
        count = (cols + 1).to(tl.float32)[None, :]
        mean = tl.cumsum(x, axis=1) / count
        var = tl.cumsum(x * x, axis=1) / count - mean * mean
        kept = var >= 0.0
        rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    else:
        mean = (tl.sum(x, axis=1) / L)[:, None]
        centred = tl.where(mask, x - mean, 0.0)
        rstd = (1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / L + eps))[:, None]
        kept = mask
    return mean, rstd, kept


@triton.jit
def _time_mix_norm_fwd(
    gate_ptr, t_ptr, theta_ptr, w_ptr, b_ptr, y_ptr,
    M, H, L, s_tb, s_th, s_tl, eps,
    GATE_PER_ROW: tl.constexpr, PREFIX: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_L)
    mask = (rows < M)[:, None] & (cols < L)[None, :]
    _, _, _, _, x = _mix(
        gate_ptr, t_ptr, theta_ptr, rows, cols, mask, M, H, L, s_tb, s_th, s_tl, GATE_PER_ROW
    )
    x = tl.where(mask, x, 0.0)  # the running sums must not see the padding
    mean, rstd, _ = _statistics(x, cols, mask, L, eps, PREFIX)
    w = tl.load(w_ptr + cols, mask=cols < L, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < L, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w[None, :] + b[None, :]
    r64 = rows.to(tl.int64)[:, None]
    tl.store(y_ptr + r64 * L + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _time_mix_norm_bwd(
    gate_ptr, t_ptr, theta_ptr, w_ptr, dy_ptr, dgate_ptr, dt_ptr, dtheta_ptr, dw_ptr, db_ptr,
    M, H, L, s_tb, s_th, s_tl, eps,
    GATE_PER_ROW: tl.constexpr, PREFIX: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_L)
    mask = (rows < M)[:, None] & (cols < L)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    s, t, theta, theta_offs, x = _mix(
        gate_ptr, t_ptr, theta_ptr, rows, cols, mask, M, H, L, s_tb, s_th, s_tl, GATE_PER_ROW
    )
    x = tl.where(mask, x, 0.0)
    mean, rstd, kept = _statistics(x, cols, mask, L, eps, PREFIX)
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    dy = tl.load(dy_ptr + r64 * L + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < L, other=0.0).to(tl.float32)
    g = dy * w[None, :]  # 0 in the padding
    if PREFIX:
        count = (cols + 1).to(tl.float32)[None, :]
        dvar = tl.where(kept, -0.5 * g * x_hat * rstd * rstd, 0.0)
        through_s1 = (-g * rstd - 2.0 * mean * dvar) / count
        through_s2 = dvar / count
        dx = (
            g * rstd
            + tl.cumsum(through_s1, axis=1, reverse=True)
            + 2.0 * x * tl.cumsum(through_s2, axis=1, reverse=True)
        )
    else:
        mean_g = (tl.sum(g, axis=1) / L)[:, None]
        mean_g_xhat = (tl.sum(g * x_hat, axis=1) / L)[:, None]
        dx = (g - mean_g - x_hat * mean_g_xhat) * rstd
    dx = tl.where(mask, dx, 0.0)
    tl.store(dt_ptr + r64 * L + cols[None, :], (dx * s).to(dt_ptr.dtype.element_ty), mask=mask)
    dtheta = (dx * (1.0 - s)).to(dtheta_ptr.dtype.element_ty)
    tl.store(dtheta_ptr + theta_offs, dtheta, mask=mask)
    dlogits = dx * (t - theta) * s * (1.0 - s)
    if GATE_PER_ROW:
        dlogits_row = tl.sum(dlogits, axis=1)
        tl.store(dgate_ptr + rows, dlogits_row.to(dgate_ptr.dtype.element_ty), mask=rows < M)
    else:
        dlogits = dlogits.to(dgate_ptr.dtype.element_ty)
        tl.store(dgate_ptr + r64 * L + cols[None, :], dlogits, mask=mask)
    # transposed, (L, programs): PyTorch adds up rows much faster than columns
    programs = tl.num_programs(0)
    tl.store(dw_ptr + cols * programs + pid, tl.sum(dy * x_hat, axis=0), mask=cols < L)
    tl.store(db_ptr + cols * programs + pid, tl.sum(dy, axis=0), mask=cols < L)


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its storage span in some order of its axes (a contiguous
    tensor or a transposed view of one): torch.empty_like then keeps its strides."""
    span = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size > 1 and stride != span:
            return False
        span *= size
    return True


class TimeMixNorm(torch.autograd.Function):
    """norm(sigmoid(gate_logits) T + (1 - sigmoid(gate_logits)) theta) along L, with the
    whole row's statistics or (prefix) each prefix's. T, theta (B, H, L), theta any
    strides; gate_logits (B, H, L) or (B, H, 1); weight, bias (L,). Output in the inputs'
    promoted dtype (float32 with float32 norm parameters, as under autocast)."""

    @staticmethod
    def forward(ctx, gate_logits, time_signal, theta, weight, bias, eps: float, prefix: bool):
        B, H, L = time_signal.shape
        if theta.shape != (B, H, L) or gate_logits.shape not in ((B, H, L), (B, H, 1)):
            raise ValueError(
                f"time_mix_norm: T {tuple(time_signal.shape)}, theta {tuple(theta.shape)} "
                f"and gate logits {tuple(gate_logits.shape)} must be (B, H, L), (B, H, L) "
                "and (B, H, L) or (B, H, 1)"
            )
        gate_logits, time_signal = gate_logits.contiguous(), time_signal.contiguous()
        if not _dense(theta):
            theta = theta.contiguous()  # any dense layout is read (and its gradient written) as is
        per_row = gate_logits.shape[-1] == 1 and L > 1
        dtype = time_signal.dtype
        for t in (gate_logits, theta, weight, bias):
            dtype = torch.promote_types(dtype, t.dtype)
        y = torch.empty((B, H, L), device=time_signal.device, dtype=dtype)
        options = LAUNCH_OPTIONS["_time_mix_norm_fwd"]
        _time_mix_norm_fwd[(triton.cdiv(B * H, options["ROWS"]),)](
            gate_logits, time_signal, theta, weight, bias, y,
            B * H, H, L, *theta.stride(), eps,
            GATE_PER_ROW=per_row, PREFIX=prefix, BLOCK_L=triton.next_power_of_2(L),
            **options, **COMPILE_OPTIONS,
        )  # fmt: skip
        ctx.save_for_backward(gate_logits, time_signal, theta, weight)
        ctx.eps, ctx.prefix, ctx.per_row, ctx.bias_dtype = eps, prefix, per_row, bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_logits, time_signal, theta, weight = ctx.saved_tensors
        B, H, L = time_signal.shape
        dy = dy.contiguous()
        dgate = torch.empty_like(gate_logits)
        dt = torch.empty_like(time_signal)
        # in theta's strides (a transposed view in the block): the gradient lands in the
        # layout of theta's producer, with no copy
        dtheta = torch.empty_like(theta)
        options = LAUNCH_OPTIONS["_time_mix_norm_bwd"]
        programs = triton.cdiv(B * H, options["ROWS"])
        partials = torch.empty((2, L, programs), device=dy.device, dtype=torch.float32)
        _time_mix_norm_bwd[(programs,)](
            gate_logits, time_signal, theta, weight, dy, dgate, dt, dtheta,
            partials[0], partials[1],
            B * H, H, L, *theta.stride(), ctx.eps,
            GATE_PER_ROW=ctx.per_row, PREFIX=ctx.prefix, BLOCK_L=triton.next_power_of_2(L),
            **options, **COMPILE_OPTIONS,
        )  # fmt: skip
        sums = row_sums(partials)  # (2, L)
        return dgate, dt, dtheta, sums[0].to(weight.dtype), sums[1].to(ctx.bias_dtype), None, None
