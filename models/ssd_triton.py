"""The SSD scan as one Triton kernel forward and two backward, for small heads.

Same function as mamba-ssm's `mamba_chunk_scan_combined` with one B/C group, D, dt_bias
and softplus (what TiM4Rec calls), and as `ssd.ssd_chunked`, the PyTorch reference. For
one batch row and head, in chunks of Q steps, with dt = softplus(dt_raw + dt_bias),
a = dt * A and cum the cumulative sum of a inside the chunk:

    y_i   = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j   # inside the chunk
          + exp(cum_i) S_in C_i + D x_i                           # the carried state
    S_out = exp(cum_last) S_in + sum_j exp(cum_last - cum_j) dt_j x_j B_j^T   # (P, N)

mamba-ssm splits this into five kernels forward and about ten backward, each a pass over
memory with its own launch, for any size. At TiM4Rec's sizes (head P = 32, state N = 32,
chunk Q = 32, L = 50-200) one program can hold a head's state in registers and walk its
chunks (other sizes work too: tiles are padded to powers of two >= 16). Three kernels:

- `_ssd_fwd`, one program per (batch row, head), walks the chunks: reads x, dt, B, C
  once, writes y and the state entering each chunk (kept for the backward pass).
- `_ssd_bwd_dstates`, one program per (batch row, head), walks them in reverse carrying
  only the state's gradient (one product per chunk) and writes it for each chunk.
- `_ssd_bwd_chunk`, one program per (batch row, chunk), computes every gradient of its
  chunk from the two stored states; no chunk waits for another. Its program loops over
  the heads, so the gradients of B and C, which the heads share, are summed in registers.

A single backward kernel walking the chunks (the first version) did all of it in 600 x 4
long programs at the ML-1M shape; split, the walk is light and the gradients run in 7x
more, shorter programs (one layer on an H200, forward + backward: 0.74 -> 0.65 ms in
fp32). Both spill registers about equally (`python -m benchmarks.kernel_registers`).
x, B and C arrive packed in one tensor, as Mamba-2's convolution outputs them, and their
gradient leaves packed the same way.
There are no atomics (dA, dD, d dt_bias: per-program sums added by PyTorch), so results
are deterministic. Matrix products run on `tl.dot` (TF32 for float32 inputs, as in
mamba-ssm); everything else in float32.

`ssd.ssd_scan` and `ssd.ssd_scan_packed` dispatch here (`ssd_kernel: fused`) or to
mamba-ssm (`ssd_kernel: mamba`); tests/test_ssd_triton.py compares both with the PyTorch
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.triton_launch import COMPILE_OPTIONS
from models.triton_vectors import row_sums
from ssd import unpack_xbc


@triton.jit
def _chunk_offsets(c, L, Q: tl.constexpr, BQ: tl.constexpr):
    """Positions of chunk c in a block of BQ >= Q rows, and which of them are real steps."""
    offs_q = tl.arange(0, BQ)
    t = c * Q + offs_q
    return t, (offs_q < Q) & (t < L)


@triton.jit
def _load_dt(
    dt_ptr, dtb_ptr, bidx, h, t, valid, A, s_dtb, s_dtl, s_dth,
    HAS_DTB: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """A chunk's step size before softplus, dt and its cumulative decay `cum` (BQ,);
    zero on padding rows (no decay, no feed)."""
    dt_raw = tl.load(dt_ptr + bidx * s_dtb + t.to(tl.int64) * s_dtl + h * s_dth,
                     mask=valid, other=0.0).to(tl.float32)  # fmt: skip
    if HAS_DTB:
        dt_raw += tl.load(dtb_ptr + h).to(tl.float32)
    dt = dt_raw
    if DT_SOFTPLUS:  # softplus, linear above 20 as F.softplus and mamba-ssm
        dt = tl.where(dt_raw <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(dt_raw, 20.0))), dt_raw)
    dt = tl.where(valid, dt, 0.0)
    return dt_raw, dt, tl.cumsum(dt * A, 0)


@triton.jit
def _load_rows(ptr, row0, t, s_l, offs, valid, width: tl.constexpr):
    """Rows t of a (L, width) slice starting at row0, as float32 (BQ, len(offs)); zero
    padding."""
    mask = valid[:, None] & (offs < width)[None, :]
    rows = tl.load(ptr + row0 + t.to(tl.int64)[:, None] * s_l + offs[None, :], mask=mask, other=0.0)
    return rows.to(tl.float32)


@triton.jit
def _state_tile(P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Offsets of a (BP, BN) tile over a head's (P, N) state: rows, columns, the row-major
    element offsets and which elements are real."""
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    state_mask = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    return offs_p, offs_n, state_offs, state_mask


@triton.jit
def _decay(cum, BQ: tl.constexpr):
    """exp(cum_i - cum_j) for i >= j, else 0: (BQ, BQ). Exponents above the diagonal are
    positive: clamped before exp, masked after."""
    offs_q = tl.arange(0, BQ)
    causal = offs_q[:, None] >= offs_q[None, :]
    return tl.where(causal, tl.exp(tl.minimum(cum[:, None] - cum[None, :], 0.0)), 0.0)


@triton.jit
def _ssd_fwd(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, y_ptr, states_ptr,
    L, H,
    s_xb, s_xl, s_xh, s_dtb, s_dtl, s_dth, s_bb, s_bl, s_cb, s_cl, s_yb, s_yl, s_yh,
    NCHUNKS: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """y, and the state entering each chunk (B, H, NCHUNKS, P, N) for the backward pass.
    One program per (batch row, head), walking its chunks."""
    bidx = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_p, offs_n, state_offs, state_mask = _state_tile(P, N, BP, BN)
    A = tl.load(a_ptr + h).to(tl.float32)
    D = 0.0
    if HAS_D:
        D = tl.load(d_ptr + h).to(tl.float32)
    state = tl.zeros((BP, BN), dtype=tl.float32)  # S entering the chunk
    states_base = states_ptr + (bidx * H + h) * NCHUNKS * P * N
    for c in range(0, NCHUNKS):
        t, valid = _chunk_offsets(c, L, Q, BQ)
        x = _load_rows(x_ptr + h * s_xh, bidx * s_xb, t, s_xl, offs_p, valid, P)
        Bc = _load_rows(b_ptr, bidx * s_bb, t, s_bl, offs_n, valid, N)
        Cc = _load_rows(c_ptr, bidx * s_cb, t, s_cl, offs_n, valid, N)
        _, dt, cum = _load_dt(dt_ptr, dtb_ptr, bidx, h, t, valid, A, s_dtb, s_dtl, s_dth,
                              HAS_DTB, DT_SOFTPLUS)  # fmt: skip
        total = tl.sum(dt * A, 0)  # cum at the chunk's end
        tl.store(states_base + c * P * N + state_offs, state, mask=state_mask)
        scores = tl.dot(Cc, tl.trans(Bc)) * _decay(cum, BQ) * dt[None, :]  # (BQ, BQ)
        y = tl.dot(scores, x)  # (BQ, BP)
        y += tl.exp(cum)[:, None] * tl.dot(Cc, tl.trans(state))
        y += D * x
        tl.store(y_ptr + bidx * s_yb + t.to(tl.int64)[:, None] * s_yl + h * s_yh + offs_p[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_p < P)[None, :])  # fmt: skip
        feed = x * (tl.exp(total - cum) * dt)[:, None]  # (BQ, BP)
        state = state * tl.exp(total) + tl.dot(tl.trans(feed), Bc)  # (BP, BN)


@triton.jit
def _ssd_bwd_dstates(
    dt_ptr, a_ptr, c_ptr, dtb_ptr, dy_ptr, dstates_ptr,
    L, H,
    s_dtb, s_dtl, s_dth, s_cb, s_cl, s_dyb, s_dyl, s_dyh,
    NCHUNKS: tl.constexpr, HAS_DTB: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """dS_c, the gradient of the state leaving chunk c (B, H, NCHUNKS, P, N): one program
    per (batch row, head) walks the chunks in reverse,
    dS_{c-1} = exp(total_c) dS_c + (exp(cum_c) dy_c)^T C_c. The only sequential part of
    the backward pass, and a light one (one product per chunk)."""
    bidx = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_p, offs_n, state_offs, state_mask = _state_tile(P, N, BP, BN)
    A = tl.load(a_ptr + h).to(tl.float32)
    d_state = tl.zeros((BP, BN), dtype=tl.float32)
    base = dstates_ptr + (bidx * H + h) * NCHUNKS * P * N
    for i in range(0, NCHUNKS):
        c = NCHUNKS - 1 - i
        t, valid = _chunk_offsets(c, L, Q, BQ)
        tl.store(base + c * P * N + state_offs, d_state, mask=state_mask)
        _, dt, cum = _load_dt(dt_ptr, dtb_ptr, bidx, h, t, valid, A, s_dtb, s_dtl, s_dth,
                              HAS_DTB, DT_SOFTPLUS)  # fmt: skip
        dy = _load_rows(dy_ptr + h * s_dyh, bidx * s_dyb, t, s_dyl, offs_p, valid, P)
        Cc = _load_rows(c_ptr, bidx * s_cb, t, s_cl, offs_n, valid, N)
        total = tl.sum(dt * A, 0)
        d_state = d_state * tl.exp(total) + tl.dot(tl.trans(dy * tl.exp(cum)[:, None]), Cc)


@triton.jit
def _ssd_bwd_chunk(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, dy_ptr, states_ptr, dstates_ptr,
    dx_ptr, ddt_ptr, db_ptr, dc_ptr, dsum_ptr,
    L,
    s_xb, s_xl, s_xh, s_dtb, s_dtl, s_dth, s_bb, s_bl, s_cb, s_cl, s_dyb, s_dyl, s_dyh,
    s_dxb, s_dxl, s_dxh, s_ddtb, s_ddtl, s_dbb, s_dbl, s_dcb, s_dcl,
    NCHUNKS: tl.constexpr, NHEADS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Every gradient of one chunk, given the state entering it (forward) and the gradient
    of the state leaving it (_ssd_bwd_dstates): no chunk waits for another. One program
    per (batch row, chunk) loops over the heads, so dB and dC (shared by the heads) are
    summed in registers and written once. Writes dx, ddt_raw, dB, dC and per program the
    sums dD, dA, d dt_bias (H, 3, B * NCHUNKS: rows, which PyTorch adds up much faster
    than columns). Each gradient is stored as soon as it is
    complete, to keep few tiles live (registers)."""
    bidx = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs_p, offs_n, state_offs, state_mask = _state_tile(P, N, BP, BN)
    t, valid = _chunk_offsets(c, L, Q, BQ)
    t64 = t.to(tl.int64)[:, None]
    mask_p = valid[:, None] & (offs_p < P)[None, :]
    mask_n = valid[:, None] & (offs_n < N)[None, :]
    Bc = _load_rows(b_ptr, bidx * s_bb, t, s_bl, offs_n, valid, N)
    Cc = _load_rows(c_ptr, bidx * s_cb, t, s_cl, offs_n, valid, N)
    cb = tl.dot(Cc, tl.trans(Bc))  # (BQ, BQ): C_i . B_j, the same for every head
    dB = tl.zeros((BQ, BN), dtype=tl.float32)
    dC = tl.zeros((BQ, BN), dtype=tl.float32)
    for h in range(0, NHEADS):
        A = tl.load(a_ptr + h).to(tl.float32)
        D = 0.0
        if HAS_D:
            D = tl.load(d_ptr + h).to(tl.float32)
        x = _load_rows(x_ptr + h * s_xh, bidx * s_xb, t, s_xl, offs_p, valid, P)
        dy = _load_rows(dy_ptr + h * s_dyh, bidx * s_dyb, t, s_dyl, offs_p, valid, P)
        dt_raw, dt, cum = _load_dt(dt_ptr, dtb_ptr, bidx, h, t, valid, A, s_dtb, s_dtl, s_dth,
                                   HAS_DTB, DT_SOFTPLUS)  # fmt: skip
        chunk_state = ((bidx * NHEADS + h) * NCHUNKS + c) * P * N + state_offs
        d_state = tl.load(dstates_ptr + chunk_state, mask=state_mask, other=0.0)
        total = tl.sum(dt * A, 0)
        exp_cum = tl.exp(cum)
        to_end = tl.exp(total - cum) * dt  # weight of step j in the state leaving the chunk
        seg = _decay(cum, BQ)
        dy_x = tl.dot(dy, tl.trans(x))  # (BQ, BQ): dy_i . x_j

        # dx: inside the chunk, through the state leaving it, through D
        cb_seg = cb * seg
        ds_b = tl.dot(Bc, tl.trans(d_state))  # (BQ, BP)
        dx = tl.dot(tl.trans(cb_seg * dt[None, :]), dy) + to_end[:, None] * ds_b + D * dy
        tl.store(dx_ptr + bidx * s_dxb + t64 * s_dxl + h * s_dxh + offs_p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_p)  # fmt: skip
        x_ds_b = tl.sum(x * ds_b, 1)  # (BQ,): x_j . dS B_j
        # d loss / d (log of each term): (i, j) inside the chunk, j into the leaving state
        e = cb_seg * dy_x  # over dt_j
        ddt = tl.sum(e, 0) + tl.exp(total - cum) * x_ds_b
        e = e * dt[None, :]
        d_cum = tl.sum(e, 1) - tl.sum(e, 0) - to_end * x_ds_b
        d_total = tl.sum(to_end * x_ds_b, 0)
        dB += to_end[:, None] * tl.dot(x, d_state)

        # dB and dC inside the chunk; dC and the decays through the entering state
        state = tl.load(states_ptr + chunk_state, mask=state_mask, other=0.0)
        d_total += tl.exp(total) * tl.sum(tl.sum(state * d_state, 1), 0)
        w = dy_x * seg * dt[None, :]
        dB += tl.dot(tl.trans(w), Cc)
        dy_state = tl.dot(dy, state)  # (BQ, BN)
        dC += tl.dot(w, Bc) + exp_cum[:, None] * dy_state
        d_cum += exp_cum * tl.sum(dy_state * Cc, 1)

        # cum_k = a_0 + ... + a_k and total = all of them; a = dt * A
        d_a = tl.cumsum(d_cum, 0, reverse=True) + d_total
        ddt += d_a * A
        if DT_SOFTPLUS:
            ddt = tl.where(dt_raw <= 20.0, ddt * tl.sigmoid(dt_raw), ddt)
        ddt = tl.where(valid, ddt, 0.0)
        tl.store(ddt_ptr + bidx * s_ddtb + t.to(tl.int64) * s_ddtl + h,
                 ddt.to(ddt_ptr.dtype.element_ty), mask=valid)  # fmt: skip
        programs = tl.num_programs(0) * NCHUNKS
        sums = dsum_ptr + h * 3 * programs + bidx * NCHUNKS + c
        tl.store(sums, tl.sum(tl.sum(dy * x, 1), 0))  # dD
        tl.store(sums + programs, tl.sum(d_a * dt, 0))  # dA
        tl.store(sums + 2 * programs, tl.sum(ddt, 0))  # d dt_bias
    tl.store(db_ptr + bidx * s_dbb + t64 * s_dbl + offs_n[None, :],
             dB.to(db_ptr.dtype.element_ty), mask=mask_n)  # fmt: skip
    tl.store(dc_ptr + bidx * s_dcb + t64 * s_dcl + offs_n[None, :],
             dC.to(dc_ptr.dtype.element_ty), mask=mask_n)  # fmt: skip


# Launch options (warps, software-pipeline stages) per kernel: the fastest of
# `python -m benchmarks.ssd_kernels --sweep` on an H200 at the ML-1M step's shape
# (docs/performance_notes.md). Two warps each: the tiles are small (32 x 32), and fewer
# threads per program leave room for more programs per SM (the chunk kernel at 4 warps:
# 0.67 ms backward per layer against 0.48 at 2 warps, one stage).
LAUNCH_OPTIONS: dict[str, dict] = {
    "_ssd_fwd": dict(num_warps=2, num_stages=2),
    "_ssd_bwd_dstates": dict(num_warps=2, num_stages=2),
    "_ssd_bwd_chunk": dict(num_warps=2, num_stages=1),
}


def _blocks(chunk_size: int, headdim: int, d_state: int) -> dict:
    """Tile sizes: powers of two >= 16 (tl.dot's least); padding is masked."""
    return dict(
        Q=chunk_size, P=headdim, N=d_state,
        BQ=max(16, triton.next_power_of_2(chunk_size)),
        BP=max(16, triton.next_power_of_2(headdim)),
        BN=max(16, triton.next_power_of_2(d_state)),
    )  # fmt: skip


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_dt(dt: torch.Tensor, A: torch.Tensor, batch: int, seqlen: int, nheads: int) -> None:
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        raise ValueError(
            f"dt must be (B, L, H) and A (H,), got {tuple(dt.shape)} and {tuple(A.shape)}"
        )


def check_shapes(x, dt, A, B, C) -> None:
    """What the fused kernel supports; a clear error for anything else."""
    batch, seqlen, nheads, _ = x.shape
    if B.dim() != 4 or B.size(2) != 1 or C.shape != B.shape:
        raise ValueError(
            f"the fused SSD kernel takes one B/C group (B, L, 1, N), got B {tuple(B.shape)} "
            f"and C {tuple(C.shape)}; use ssd_kernel: mamba for several groups"
        )
    _check_dt(dt, A, batch, seqlen, nheads)


class FusedSSD(torch.autograd.Function):
    """y = SSD(x, dt, A, B, C, D, dt_bias) with x, B, C packed in one tensor xBC
    (B, L, H * P + 2N), as Mamba-2's convolution outputs them; their gradient comes back
    packed the same way, so autograd needs no concatenation. Module docstring."""

    @staticmethod
    def forward(ctx, xBC, dt, A, D, dt_bias, nheads: int, d_state: int, chunk_size: int,
                dt_softplus: bool):  # fmt: skip
        xBC = _last_dim_contiguous(xBC)
        x, B, C = unpack_xbc(xBC, nheads, d_state)
        batch, seqlen, _, headdim = x.shape
        nchunks = triton.cdiv(seqlen, chunk_size)
        y = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
        states = torch.empty(
            batch, nheads, nchunks, headdim, d_state, device=x.device, dtype=torch.float32
        )  # the state entering each chunk, for the backward pass
        A32 = A.float()
        _ssd_fwd[(batch, nheads)](
            x, dt, A32, B, C, D, dt_bias, y, states,
            seqlen, nheads,
            x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
            B.stride(0), B.stride(1), C.stride(0), C.stride(1),
            y.stride(0), y.stride(1), y.stride(2),
            NCHUNKS=nchunks, HAS_D=D is not None, HAS_DTB=dt_bias is not None,
            DT_SOFTPLUS=dt_softplus,
            **_blocks(chunk_size, headdim, d_state),
            **LAUNCH_OPTIONS["_ssd_fwd"], **COMPILE_OPTIONS,
        )  # fmt: skip
        ctx.save_for_backward(xBC, dt, A32, D, dt_bias, states)
        ctx.sizes = (nheads, d_state, chunk_size)
        ctx.dt_softplus, ctx.a_dtype = dt_softplus, A.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xBC, dt, A32, D, dt_bias, states = ctx.saved_tensors
        nheads, d_state, chunk_size = ctx.sizes
        x, B, C = unpack_xbc(xBC, nheads, d_state)
        batch, seqlen, _, headdim = x.shape
        nchunks = states.size(2)
        dy = _last_dim_contiguous(dy)
        flags = dict(
            HAS_DTB=dt_bias is not None, DT_SOFTPLUS=ctx.dt_softplus,
            **_blocks(chunk_size, headdim, d_state),
        )  # fmt: skip
        d_xBC = torch.empty(xBC.shape, device=xBC.device, dtype=xBC.dtype)
        dx, dB, dC = unpack_xbc(d_xBC, nheads, d_state)
        ddt = torch.empty(batch, seqlen, nheads, device=dt.device, dtype=dt.dtype)
        strides = (
            x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
            B.stride(0), B.stride(1), C.stride(0), C.stride(1),
            dy.stride(0), dy.stride(1), dy.stride(2), dx.stride(0), dx.stride(1), dx.stride(2),
        )  # fmt: skip
        d_states = torch.empty_like(states)  # gradient of the state leaving each chunk
        _ssd_bwd_dstates[(batch, nheads)](
            dt, A32, C, dt_bias, dy, d_states,
            seqlen, nheads,
            dt.stride(0), dt.stride(1), dt.stride(2), C.stride(0), C.stride(1),
            dy.stride(0), dy.stride(1), dy.stride(2),
            NCHUNKS=nchunks, **flags, **LAUNCH_OPTIONS["_ssd_bwd_dstates"], **COMPILE_OPTIONS,
        )  # fmt: skip
        sums = torch.empty(nheads, 3, batch * nchunks, device=dt.device, dtype=torch.float32)
        _ssd_bwd_chunk[(batch, nchunks)](
            x, dt, A32, B, C, D, dt_bias, dy, states, d_states, dx, ddt, dB, dC, sums,
            seqlen, *strides, ddt.stride(0), ddt.stride(1),
            dB.stride(0), dB.stride(1), dC.stride(0), dC.stride(1),
            NCHUNKS=nchunks, NHEADS=nheads, HAS_D=D is not None, **flags,
            **LAUNCH_OPTIONS["_ssd_bwd_chunk"], **COMPILE_OPTIONS,
        )  # fmt: skip
        sums = row_sums(sums)  # (H, 3): dD, dA, d dt_bias
        dD = sums[:, 0].to(D.dtype) if D is not None else None
        dA = sums[:, 1].to(ctx.a_dtype)
        d_dt_bias = sums[:, 2].to(dt_bias.dtype) if dt_bias is not None else None
        return d_xBC, ddt, dA, dD, d_dt_bias, None, None, None, None


def fused_ssd_packed(
    xBC: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    nheads: int,
    d_state: int,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """xBC (B, L, H * P + 2N) packing x (B, L, H, P), B and C (B, L, N) (one group), dt
    (B, L, H), A, D and dt_bias (H) -> y (B, L, H, P)."""
    if (xBC.size(-1) - 2 * d_state) % nheads or xBC.size(-1) <= 2 * d_state:
        raise ValueError(
            f"xBC's last dimension ({xBC.size(-1)}) must be H * P + 2N with H = {nheads} "
            f"heads and N = {d_state}"
        )
    _check_dt(dt, A, *xBC.shape[:2], nheads)
    return FusedSSD.apply(xBC, dt, A, D, dt_bias, nheads, d_state, chunk_size, dt_softplus)


def fused_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """x (B, L, H, P), dt (B, L, H), A (H), B and C (B, L, 1, N), D and dt_bias (H) ->
    y (B, L, H, P); arguments as `ssd.ssd_chunked` and mamba-ssm's combined scan. Packs
    x, B, C into one tensor (a copy); the model passes its packed conv output to
    `fused_ssd_packed` directly."""
    check_shapes(x, dt, A, B, C)
    xBC = torch.cat([x.flatten(2), B[:, :, 0], C[:, :, 0]], dim=-1)
    return fused_ssd_packed(
        xBC, dt, A, x.size(2), B.size(-1), chunk_size, D=D, dt_bias=dt_bias,
        dt_softplus=dt_softplus,
    )  # fmt: skip
