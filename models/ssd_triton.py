"""The SSD scan as one Triton kernel forward and one backward, for small heads.

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
chunks (other sizes work too: tiles are padded to powers of two >= 16). The forward
kernel reads x, dt, B, C once and writes y and the state entering each chunk (kept for
the backward pass); the backward kernel walks the chunks in reverse with the state's
gradient in registers and writes every gradient. Each program owns one
(batch row, head); B and C are shared by the heads, so their gradients are written per
head and summed by PyTorch (deterministic, no atomics). Matrix products run on `tl.dot`
(TF32 for float32 inputs, as in mamba-ssm); everything else in float32.

`ssd.ssd_scan` dispatches here (`ssd_kernel: fused`) or to mamba-ssm (`ssd_kernel: mamba`);
tests/test_ssd_triton.py compares both with the PyTorch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_offsets(c, L, Q: tl.constexpr, BQ: tl.constexpr):
    """Positions of chunk c in a block of BQ >= Q rows, and which of them are real steps."""
    offs_q = tl.arange(0, BQ)
    t = c * Q + offs_q
    return t, (offs_q < Q) & (t < L)


@triton.jit
def _load_chunk(
    x_ptr, dt_ptr, dtb_ptr, b_ptr, c_ptr, bidx, h, t, valid, offs_p, offs_n, A,
    s_xb, s_xl, s_xh, s_dtb, s_dtl, s_dth, s_bb, s_bl, s_cb, s_cl,
    P: tl.constexpr, N: tl.constexpr, HAS_DTB: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """One chunk's x (BQ, BP), B and C (BQ, BN), the step size before softplus, dt and its
    cumulative decay `cum` (BQ,); padding rows and columns are zero (no decay, no feed)."""
    t64 = t.to(tl.int64)[:, None]
    mask_p = valid[:, None] & (offs_p < P)[None, :]
    mask_n = valid[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + bidx * s_xb + t64 * s_xl + h * s_xh + offs_p[None, :], mask=mask_p,
                other=0.0).to(tl.float32)  # fmt: skip
    Bc = tl.load(b_ptr + bidx * s_bb + t64 * s_bl + offs_n[None, :], mask=mask_n, other=0.0)
    Cc = tl.load(c_ptr + bidx * s_cb + t64 * s_cl + offs_n[None, :], mask=mask_n, other=0.0)
    dt_raw = tl.load(dt_ptr + bidx * s_dtb + t.to(tl.int64) * s_dtl + h * s_dth,
                     mask=valid, other=0.0).to(tl.float32)  # fmt: skip
    if HAS_DTB:
        dt_raw += tl.load(dtb_ptr + h).to(tl.float32)
    dt = dt_raw
    if DT_SOFTPLUS:  # softplus, linear above 20 as F.softplus and mamba-ssm
        dt = tl.where(dt_raw <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(dt_raw, 20.0))), dt_raw)
    dt = tl.where(valid, dt, 0.0)
    cum = tl.cumsum(dt * A, 0)
    return x, Bc.to(tl.float32), Cc.to(tl.float32), dt_raw, dt, cum


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
    """y, and the state entering each chunk (B, H, NCHUNKS, P, N) for the backward pass."""
    bidx = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    state_mask = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    A = tl.load(a_ptr + h).to(tl.float32)
    D = 0.0
    if HAS_D:
        D = tl.load(d_ptr + h).to(tl.float32)
    state = tl.zeros((BP, BN), dtype=tl.float32)  # S entering the chunk
    states_base = states_ptr + (bidx * H + h) * NCHUNKS * P * N
    for c in range(0, NCHUNKS):
        t, valid = _chunk_offsets(c, L, Q, BQ)
        x, Bc, Cc, _, dt, cum = _load_chunk(
            x_ptr, dt_ptr, dtb_ptr, b_ptr, c_ptr, bidx, h, t, valid, offs_p, offs_n, A,
            s_xb, s_xl, s_xh, s_dtb, s_dtl, s_dth, s_bb, s_bl, s_cb, s_cl,
            P, N, HAS_DTB, DT_SOFTPLUS,
        )  # fmt: skip
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
def _ssd_bwd(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, dy_ptr, states_ptr,
    dx_ptr, ddt_ptr, db_ptr, dc_ptr, dsum_ptr,
    L, H,
    s_xb, s_xl, s_xh, s_dtb, s_dtl, s_dth, s_bb, s_bl, s_cb, s_cl, s_dyb, s_dyl, s_dyh,
    NCHUNKS: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Gradients, walking the chunks in reverse with dS (the gradient of the state leaving
    the chunk) in registers. Writes dx (B, L, H, P), ddt_raw (B, L, H), dB and dC per head
    (B, L, H, N) and per program the sums dD, dA, d dt_bias (B, H, 3). Each gradient is
    stored as soon as it is complete, to keep few tiles live (registers)."""
    bidx = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    state_offs = offs_p[:, None] * N + offs_n[None, :]
    state_mask = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    A = tl.load(a_ptr + h).to(tl.float32)
    D = 0.0
    if HAS_D:
        D = tl.load(d_ptr + h).to(tl.float32)
    d_state = tl.zeros((BP, BN), dtype=tl.float32)
    dD = 0.0
    dA = 0.0
    ddt_bias = 0.0
    states_base = states_ptr + (bidx * H + h) * NCHUNKS * P * N
    for i in range(0, NCHUNKS):
        c = NCHUNKS - 1 - i
        t, valid = _chunk_offsets(c, L, Q, BQ)
        t64 = t.to(tl.int64)[:, None]
        mask_p = valid[:, None] & (offs_p < P)[None, :]
        mask_n = valid[:, None] & (offs_n < N)[None, :]
        x, Bc, Cc, dt_raw, dt, cum = _load_chunk(
            x_ptr, dt_ptr, dtb_ptr, b_ptr, c_ptr, bidx, h, t, valid, offs_p, offs_n, A,
            s_xb, s_xl, s_xh, s_dtb, s_dtl, s_dth, s_bb, s_bl, s_cb, s_cl,
            P, N, HAS_DTB, DT_SOFTPLUS,
        )  # fmt: skip
        total = tl.sum(dt * A, 0)
        dy = tl.load(dy_ptr + bidx * s_dyb + t64 * s_dyl + h * s_dyh + offs_p[None, :],
                     mask=mask_p, other=0.0).to(tl.float32)  # fmt: skip
        exp_cum = tl.exp(cum)
        to_end = tl.exp(total - cum) * dt  # weight of step j in the state leaving the chunk
        seg = _decay(cum, BQ)
        dy_x = tl.dot(dy, tl.trans(x))  # (BQ, BQ): dy_i . x_j

        # dx: inside the chunk, through the state leaving it, through D
        cb_seg = tl.dot(Cc, tl.trans(Bc)) * seg
        ds_b = tl.dot(Bc, tl.trans(d_state))  # (BQ, BP)
        dx = tl.dot(tl.trans(cb_seg * dt[None, :]), dy) + to_end[:, None] * ds_b + D * dy
        tl.store(dx_ptr + bidx * L * H * P + t64 * H * P + h * P + offs_p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_p)  # fmt: skip
        x_ds_b = tl.sum(x * ds_b, 1)  # (BQ,): x_j . dS B_j
        # d loss / d (log of each term): (i, j) inside the chunk, j into the leaving state
        e = cb_seg * dy_x  # over dt_j
        ddt = tl.sum(e, 0) + tl.exp(total - cum) * x_ds_b
        e = e * dt[None, :]
        d_cum = tl.sum(e, 1) - tl.sum(e, 0) - to_end * x_ds_b
        state = tl.load(states_base + c * P * N + state_offs, mask=state_mask, other=0.0)
        d_total = tl.sum(to_end * x_ds_b, 0) + tl.exp(total) * tl.sum(tl.sum(state * d_state, 1), 0)

        # dB and dC: inside the chunk, the leaving state (dB), the entering state (dC)
        w = dy_x * seg * dt[None, :]
        per_head = bidx * L * H * N + t64 * H * N + h * N + offs_n[None, :]
        dB = tl.dot(tl.trans(w), Cc) + to_end[:, None] * tl.dot(x, d_state)
        tl.store(db_ptr + per_head, dB, mask=mask_n)
        dy_state = tl.dot(dy, state)  # (BQ, BN)
        dC = tl.dot(w, Bc) + exp_cum[:, None] * dy_state
        tl.store(dc_ptr + per_head, dC, mask=mask_n)
        d_cum += exp_cum * tl.sum(dy_state * Cc, 1)

        dD += tl.sum(tl.sum(dy * x, 1), 0)
        d_state = d_state * tl.exp(total) + tl.dot(tl.trans(dy * exp_cum[:, None]), Cc)

        # cum_k = a_0 + ... + a_k and total = all of them; a = dt * A
        d_a = tl.cumsum(d_cum, 0, reverse=True) + d_total
        ddt += d_a * A
        dA += tl.sum(d_a * dt, 0)
        if DT_SOFTPLUS:
            ddt = tl.where(dt_raw <= 20.0, ddt * tl.sigmoid(dt_raw), ddt)
        ddt = tl.where(valid, ddt, 0.0)
        ddt_bias += tl.sum(ddt, 0)
        tl.store(ddt_ptr + bidx * L * H + t.to(tl.int64) * H + h,
                 ddt.to(ddt_ptr.dtype.element_ty), mask=valid)  # fmt: skip
    sums = dsum_ptr + (bidx * H + h) * 3
    tl.store(sums, dD)
    tl.store(sums + 1, dA)
    tl.store(sums + 2, ddt_bias)


# Launch options (warps, software-pipeline stages) of the two kernels; None: the defaults
# below, the fastest of `python -m benchmarks.ssd_kernels --sweep` on an H200 at the
# ML-1M step's shape (docs/performance_notes.md). Set them to sweep.
FWD_OPTIONS: dict | None = None
BWD_OPTIONS: dict | None = None


def _launch_options(chosen: dict | None) -> dict:
    # two warps: a program's tiles are small (32 x 32), and fewer threads per program leave
    # room for more programs per SM; the backward kernel spills either way
    return chosen if chosen is not None else dict(num_warps=2, num_stages=2)


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


def check_shapes(x, dt, A, B, C) -> None:
    """What the fused kernel supports; a clear error for anything else."""
    batch, seqlen, nheads, _ = x.shape
    if B.dim() != 4 or B.size(2) != 1 or C.shape != B.shape:
        raise ValueError(
            f"the fused SSD kernel takes one B/C group (B, L, 1, N), got B {tuple(B.shape)} "
            f"and C {tuple(C.shape)}; use ssd_kernel: mamba for several groups"
        )
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        raise ValueError(
            f"dt must be (B, L, H) and A (H,), got {tuple(dt.shape)} and {tuple(A.shape)}"
        )


class FusedSSD(torch.autograd.Function):
    """y = SSD(x, dt, A, B, C, D, dt_bias), one kernel each way (module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, chunk_size: int, dt_softplus: bool):
        check_shapes(x, dt, A, B, C)
        batch, seqlen, nheads, headdim = x.shape
        d_state = B.size(-1)
        x = _last_dim_contiguous(x)
        B2, C2 = _last_dim_contiguous(B[:, :, 0]), _last_dim_contiguous(C[:, :, 0])  # (B, L, N)
        nchunks = triton.cdiv(seqlen, chunk_size)
        y = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
        states = torch.empty(
            batch, nheads, nchunks, headdim, d_state, device=x.device, dtype=torch.float32
        )  # the state entering each chunk, for the backward pass
        A32 = A.float()
        _ssd_fwd[(batch, nheads)](
            x, dt, A32, B2, C2, D, dt_bias, y, states,
            seqlen, nheads,
            x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
            B2.stride(0), B2.stride(1), C2.stride(0), C2.stride(1),
            y.stride(0), y.stride(1), y.stride(2),
            NCHUNKS=nchunks, HAS_D=D is not None, HAS_DTB=dt_bias is not None,
            DT_SOFTPLUS=dt_softplus,
            **_blocks(chunk_size, headdim, d_state),
            **_launch_options(FWD_OPTIONS),
        )  # fmt: skip
        ctx.save_for_backward(x, dt, A32, B2, C2, D, dt_bias, states)
        ctx.chunk_size, ctx.dt_softplus = chunk_size, dt_softplus
        ctx.dtypes = (A.dtype, B.dtype, C.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A32, B2, C2, D, dt_bias, states = ctx.saved_tensors
        batch, seqlen, nheads, headdim = x.shape
        d_state = B2.size(-1)
        dy = _last_dim_contiguous(dy)
        dx = torch.empty(batch, seqlen, nheads, headdim, device=x.device, dtype=x.dtype)
        ddt = torch.empty(batch, seqlen, nheads, device=x.device, dtype=dt.dtype)
        per_head = dict(device=x.device, dtype=torch.float32)
        dB_heads = torch.empty(batch, seqlen, nheads, d_state, **per_head)
        dC_heads = torch.empty(batch, seqlen, nheads, d_state, **per_head)
        sums = torch.empty(batch, nheads, 3, **per_head)  # dD, dA, d dt_bias per program
        _ssd_bwd[(batch, nheads)](
            x, dt, A32, B2, C2, D, dt_bias, dy, states, dx, ddt, dB_heads, dC_heads, sums,
            seqlen, nheads,
            x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
            B2.stride(0), B2.stride(1), C2.stride(0), C2.stride(1),
            dy.stride(0), dy.stride(1), dy.stride(2),
            NCHUNKS=states.size(2), HAS_D=D is not None, HAS_DTB=dt_bias is not None,
            DT_SOFTPLUS=ctx.dt_softplus,
            **_blocks(ctx.chunk_size, headdim, d_state),
            **_launch_options(BWD_OPTIONS),
        )  # fmt: skip
        a_dtype, b_dtype, c_dtype = ctx.dtypes
        dB = dB_heads.sum(2, keepdim=True).to(b_dtype)  # (B, L, 1, N)
        dC = dC_heads.sum(2, keepdim=True).to(c_dtype)
        sums = sums.sum(0)  # (H, 3)
        dD = sums[:, 0].to(D.dtype) if D is not None else None
        dA = sums[:, 1].to(a_dtype)
        d_dt_bias = sums[:, 2].to(dt_bias.dtype) if dt_bias is not None else None
        return dx, ddt, dA, dB, dC, dD, d_dt_bias, None, None


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
    y (B, L, H, P); arguments as `ssd.ssd_chunked` and mamba-ssm's combined scan."""
    return FusedSSD.apply(x, dt, A, B, C, D, dt_bias, chunk_size, dt_softplus)
