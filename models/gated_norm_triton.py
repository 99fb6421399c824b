"""The gated RMSNorm of the SSD block, row-tiled, as Triton kernels.

    v = x * silu(z + z_bias);   y = v / sqrt(mean(v^2) + eps) * weight   (over the last axis)

The same function as mamba-ssm's `rmsnorm_fn(x, weight, None, z=z,
norm_before_gate=False)` and `ssd.rmsnorm_gated_reference`. mamba-ssm's kernels handle
one row per program forward and a long walk over rows per program backward; at TiM4Rec's
rows of 128 that took 73 us forward and 191 us backward per layer at the ML-1M step's shape
on an H200, against ~13 and ~21 us of memory traffic (docs/performance_notes.md). Here a
program normalises a tile of rows each way; only 1/rms per row is stored, the backward
pass recomputes v from x and z and writes dx, dz and per-program weight sums (added up by
PyTorch: deterministic). Float32 arithmetic; y, dx and dz in their inputs' dtypes.

z_bias (optional) is the bias of the product z comes from (in_proj's gate columns), added
here: its gradient, the column sum of dz, is summed per program beside the weight's.

`ssd.rmsnorm_gated` dispatches here (`ssd_kernel: fused`) or to mamba-ssm (`ssd_kernel:
mamba`) on the Triton backend; tests/test_gated_norm.py compares both with the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from models.split_gradient import gradient_buffer
from models.triton_launch import COMPILE_OPTIONS
from models.triton_vectors import as_rows, row_sums

# Rows per program and warps, per kernel. `python -m benchmarks.norm_kernels --sweep`
# times the alternatives.
LAUNCH_OPTIONS: dict[str, dict] = {
    "_gated_rms_norm_fwd": dict(ROWS=32, num_warps=4),
    "_gated_rms_norm_bwd": dict(ROWS=32, num_warps=4),
}


@triton.jit
def _gate(x_ptr, z_ptr, zb_ptr, r64, cols, mask, s_x, s_z, N, HAS_ZBIAS: tl.constexpr):
    """x, z (+ z_bias) and v = x * silu(z) for a tile of rows (r64: row indices, int64),
    float32."""
    x = tl.load(x_ptr + r64 * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r64 * s_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZBIAS:
        z += tl.load(zb_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    sig = tl.sigmoid(z)
    return x, z, sig, x * z * sig


@triton.jit
def _gated_rms_norm_fwd(
    x_ptr, z_ptr, zb_ptr, w_ptr, y_ptr, rstd_ptr,
    M, N, s_x, s_z, s_y, eps,
    HAS_ZBIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    _, _, _, v = _gate(x_ptr, z_ptr, zb_ptr, r64, cols, mask, s_x, s_z, N, HAS_ZBIAS)
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / N + eps)  # (ROWS,)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = v * rstd[:, None] * w[None, :]
    tl.store(y_ptr + r64 * s_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _gated_rms_norm_bwd(
    x_ptr, z_ptr, zb_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr, dzb_ptr,
    M, N, s_x, s_z, s_dy, s_dx, s_dz,
    HAS_ZBIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx, dz, and this program's sums of dy * v / rms (the weight's gradient) in
    dw[:, pid] and of dz (z_bias's) in dzb[:, pid] (transposed, (N, programs): PyTorch
    adds up rows much faster than columns)."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x, z, sig, v = _gate(x_ptr, z_ptr, zb_ptr, r64, cols, mask, s_x, s_z, N, HAS_ZBIAS)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + r64 * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    normed = v * rstd[:, None]
    tl.store(dw_ptr + cols * tl.num_programs(0) + pid, tl.sum(dy * normed, axis=0), mask=cols < N)
    dyw = dy * w[None, :]
    # d/dv of v * rstd(v): rstd * (dyw - normed * mean(dyw * normed))
    dv = rstd[:, None] * (dyw - normed * (tl.sum(dyw * normed, axis=1) / N)[:, None])
    dx = dv * z * sig
    dz = dv * x * sig * (1.0 + z * (1.0 - sig))  # silu'(z)
    tl.store(dx_ptr + r64 * s_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + r64 * s_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if HAS_ZBIAS:  # dz is zero outside the tile (x loads as 0 there)
        tl.store(dzb_ptr + cols * tl.num_programs(0) + pid, tl.sum(dz, axis=0), mask=cols < N)


class GatedRMSNorm(torch.autograd.Function):
    """y = RMSNorm(x * silu(z + z_bias)) * weight over the last axis (module docstring);
    `z_bias` may be None. `dz_into` (optional, called in backward) gives the tensor to
    write z's gradient into (models/split_gradient.py)."""

    @staticmethod
    def forward(ctx, x, z, weight, eps: float, z_bias=None, dz_into=None):
        shape = x.shape
        x2, z2 = as_rows(x), as_rows(z)
        M, N = x2.shape
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        block_n = triton.next_power_of_2(N)
        options = LAUNCH_OPTIONS["_gated_rms_norm_fwd"]
        _gated_rms_norm_fwd[(triton.cdiv(M, options["ROWS"]),)](
            x2, z2, z_bias, weight, y, rstd, M, N, x2.stride(0), z2.stride(0), y.stride(0), eps,
            HAS_ZBIAS=z_bias is not None, BLOCK_N=block_n, **options, **COMPILE_OPTIONS,
        )  # fmt: skip
        ctx.save_for_backward(x2, z2, z_bias, weight, rstd)
        ctx.shapes, ctx.dz_into = (shape, z.shape), dz_into
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, z2, z_bias, weight, rstd = ctx.saved_tensors
        x_shape, z_shape = ctx.shapes
        dy2 = as_rows(dy)
        M, N = x2.shape
        options = LAUNCH_OPTIONS["_gated_rms_norm_bwd"]
        programs = triton.cdiv(M, options["ROWS"])
        dx = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        dz = as_rows(gradient_buffer(ctx.dz_into, z2))
        # per-program sums of the weight's and z_bias's gradients: one reduction for both
        partials = torch.empty(
            (1 if z_bias is None else 2, N, programs), device=x2.device, dtype=torch.float32
        )
        _gated_rms_norm_bwd[(programs,)](
            x2, z2, z_bias, weight, dy2, rstd, dx, dz, partials[0], partials[-1],
            M, N, x2.stride(0), z2.stride(0), dy2.stride(0), dx.stride(0), dz.stride(0),
            HAS_ZBIAS=z_bias is not None, BLOCK_N=triton.next_power_of_2(N),
            **options, **COMPILE_OPTIONS,
        )  # fmt: skip
        sums = row_sums(partials)
        dz_bias = None if z_bias is None else sums[1].to(z_bias.dtype)
        return dx.view(x_shape), dz.view(z_shape), sums[0].to(weight.dtype), None, dz_bias, None


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    z_bias: torch.Tensor | None = None,
    dz_into: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x, z (..., N) in any dtype and row strides, weight and z_bias (N,) -> y (..., N)
    in x's dtype; `dz_into` as GatedRMSNorm's."""
    return GatedRMSNorm.apply(x, z, weight, eps, z_bias, dz_into)
