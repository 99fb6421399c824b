"""The time-aware SSD (Mamba-2) block of TiM4Rec, and the SSD scan it runs on.

Two implementations of one function, behind one dispatch (`ssd_scan`, `rmsnorm_gated`):

- ``"triton"``: Triton kernels on CUDA tensors (models/backend.py chooses): this
  project's (`ssd_kernel: fused`: the one-kernel-each-way SSD of models/ssd_triton.py, the
  row-tiled gated norm of models/gated_norm_triton.py) or mamba-ssm's
  (`ssd_kernel: mamba`: `mamba_chunk_scan_combined`, `rmsnorm_fn`).
- ``"torch"``: the chunked algorithm in plain PyTorch (`ssd_chunked`), for CPUs, for
  machines without mamba-ssm, and as the reference the kernels are tested against.

What SSD computes, per batch row and head h (see ../shared/TIM4REC_SPEC.md), with
delta_t = softplus(dt_t + dt_bias) and a = A[h] < 0:

    S_t = exp(delta_t * a) * S_{t-1} + delta_t * x_t B_t^T        # (P, N)
    y_t = S_t C_t + D * x_t

`ssd_recurrent` is exactly that loop (slow, for tests); `ssd_chunked` computes the same
thing in chunks of Q steps: the quadratic dual form inside each chunk, states carried
between chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backend import BACKENDS, import_mamba_triton, resolve_backend
from models.layers import (
    Dropout,
    LowerTriangularLinear,
    PrefixLayerNorm,
    fuses_bias,
    product,
    time_mix_norm,
)
from models.split_gradient import split_columns

SSD_KERNELS = ("fused", "mamba")  # the Triton backend's scan and gated norm: ours, mamba-ssm's


def check_ssd_kernel(kernel: str) -> str:
    if kernel not in SSD_KERNELS:
        raise ValueError(f"ssd_kernel must be one of {SSD_KERNELS}, got {kernel!r}")
    return kernel


# --------------------------------------------------------------------------------------
# PyTorch reference implementations
# --------------------------------------------------------------------------------------


def _decay_matrix(cumsum: torch.Tensor) -> torch.Tensor:
    """exp(cumsum_i - cumsum_j) for i >= j, 0 above the diagonal: (..., T) -> (..., T, T).

    With a = A * delta <= 0, every kept exponent is <= 0, so the difference of cumulative
    sums is as safe as a segment sum (mamba-ssm's kernels do the same inside a chunk).
    """
    T = cumsum.size(-1)
    diff = cumsum[..., :, None] - cumsum[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=cumsum.device).tril()
    return torch.exp(diff.masked_fill(~causal, -math.inf))


def _discretize(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    dtype = torch.promote_types(dt.dtype, torch.float32)  # at least float32, float64 stays
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def _heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(B, L, G, N) -> (B, L, H, N): each group serves H / G consecutive heads."""
    return t.repeat_interleave(nheads // t.size(2), dim=2)


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """SSD as a step-by-step recurrence; O(L) Python steps, for tests and documentation.

    x (B, L, H, P), dt (B, L, H), A (H), B and C (B, L, G, N), D (H) -> y (B, L, H, P).
    """
    batch, seqlen, nheads, headdim = x.shape
    delta = _discretize(dt, dt_bias, dt_softplus).to(x.dtype)  # (B, L, H)
    Bh, Ch = _heads_from_groups(B, nheads), _heads_from_groups(C, nheads)  # (B, L, H, N)
    state = x.new_zeros(batch, nheads, headdim, B.size(-1))  # (B, H, P, N)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(delta[:, t] * A)  # (B, H)
        update = (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        state = decay[..., None, None] * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)  # (B, L, H, P)
    if D is not None:
        y = y + D[:, None] * x
    return y


def ssd_chunked(
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
    """SSD by the chunked (state space duality) algorithm in plain PyTorch.

    Same arguments and result as mamba-ssm's `mamba_chunk_scan_combined` (without z,
    initial states or varlen): x (B, L, H, P), dt (B, L, H), A (H), B and C (B, L, G, N),
    D (H), dt_bias (H). Any L: the tail is padded to a whole chunk with dt = 0, which
    neither decays nor feeds the state, and cut off again.
    """
    batch, seqlen, nheads, headdim = x.shape
    Q = chunk_size
    delta = _discretize(dt, dt_bias, dt_softplus).to(x.dtype)  # (B, L, H)
    pad = (-seqlen) % Q
    xs, Bs, Cs = x, B, C
    if pad:
        xs = F.pad(x, (0, 0, 0, 0, 0, pad))
        delta = F.pad(delta, (0, 0, 0, pad))
        Bs = F.pad(B, (0, 0, 0, 0, 0, pad))
        Cs = F.pad(C, (0, 0, 0, 0, 0, pad))
    nchunks = (seqlen + pad) // Q
    groups = B.size(2)

    # Layout (B, G, H/G, c, Q, .): heads split as (G, H/G) to share B and C, then chunks of
    # Q steps, so that every product below is a batched matmul over (B, G, H/G, c).
    K = nheads // groups
    X = (xs * delta[..., None]).view(batch, nchunks, Q, groups, K, headdim)
    X = X.permute(0, 3, 4, 1, 2, 5)  # (B, G, K, c, Q, P)
    Bc = Bs.view(batch, nchunks, Q, groups, -1).permute(0, 3, 1, 2, 4)[
        :, :, None
    ]  # (B, G, 1, c, Q, N)
    Cc = Cs.view(batch, nchunks, Q, groups, -1).permute(0, 3, 1, 2, 4)[:, :, None]
    A_dt = (delta * A).view(batch, nchunks, Q, groups, K).permute(0, 3, 4, 1, 2)  # (B, G, K, c, Q)
    A_cum = torch.cumsum(A_dt, dim=-1)

    # 1. Inside each chunk: y = (M o C B^T) X, the quadratic (attention-like) form.
    scores = (Cc @ Bc.transpose(-1, -2)) * _decay_matrix(A_cum)  # (B, G, K, c, Q, Q)
    y_diag = scores @ X  # (B, G, K, c, Q, P)

    # 2. Each chunk's contribution to the state at its end: sum_s decay(s) B_s X_s^T.
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (B, G, K, c, Q)
    states = (Bc.transpose(-1, -2) * decay_to_end[..., None, :]) @ X  # (B, G, K, c, N, P)

    # 3. Carry states across chunks: the state at the end of chunk z sums the chunks
    # j <= z, each decayed over the chunks after it; chunk z starts from that of z - 1.
    decay_chunks = _decay_matrix(torch.cumsum(A_cum[..., -1], dim=-1))  # (B, G, K, c, c)
    states_end = (decay_chunks @ states.flatten(-2)).view_as(states)
    states_in = torch.cat(
        [torch.zeros_like(states_end[..., :1, :, :]), states_end[..., :-1, :, :]], dim=-3
    )

    # 4. The carried state read out at every step of the chunk.
    y_off = (Cc @ states_in) * torch.exp(A_cum)[..., None]  # (B, G, K, c, Q, P)

    y = (y_diag + y_off).permute(0, 3, 4, 1, 2, 5)  # (B, c, Q, G, K, P)
    y = y.reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + D[:, None] * x
    return y


def rmsnorm_gated_reference(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    z_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate, then RMS-normalise: v = x * silu(z + z_bias); weight * v / sqrt(mean(v^2) + eps)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32, float64 stays
    z = z.to(dtype) if z_bias is None else z.to(dtype) + z_bias.to(dtype)
    v = x.to(dtype) * F.silu(z)
    out = v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (out * weight.to(dtype)).to(x.dtype)


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def even_chunk_size(seqlen: int, chunk_size: int) -> int:
    """The shortest chunk length that keeps ceil(seqlen / chunk_size) chunks: 2 x 25 steps
    for L = 50 and chunk_size 32, instead of 2 x 32 of which 14 are padding."""
    nchunks = -(-seqlen // chunk_size)
    return -(-seqlen // nchunks)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    backend: str = "auto",
    kernel: str = "fused",
) -> torch.Tensor:
    """SSD scan, (B, L, H, P) -> (B, L, H, P), on the backend chosen for `x.device`; on
    the Triton backend, `kernel` picks the fused kernel or mamba-ssm's (SSD_KERNELS)."""
    check_ssd_kernel(kernel)
    if resolve_backend(backend, x.device) == "triton":
        if kernel == "fused":
            from models.ssd_triton import fused_ssd

            return fused_ssd(
                x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus
            )
        mamba_chunk_scan_combined, _ = import_mamba_triton()
        return mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=chunk_size,
            D=D,
            dt_bias=dt_bias,
            dt_softplus=dt_softplus,
        )
    # The chunk length of the PyTorch path sets its work, not its result (up to rounding):
    # chunks as even as their number allows, less padding to compute.
    Q = even_chunk_size(x.size(1), chunk_size)
    return ssd_chunked(x, dt, A, B, C, Q, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)


def unpack_xbc(xBC: torch.Tensor, nheads: int, d_state: int) -> tuple[torch.Tensor, ...]:
    """Views x (B, L, H, P), B and C (B, L, N) of Mamba-2's packed conv output xBC
    (B, L, H * P + 2N)."""
    d_inner = xBC.size(-1) - 2 * d_state
    x, B, C = torch.split(xBC, [d_inner, d_state, d_state], dim=-1)
    return x.unflatten(-1, (nheads, d_inner // nheads)), B, C


def ssd_scan_packed(
    xBC: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    d_state: int,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    backend: str = "auto",
    kernel: str = "fused",
) -> torch.Tensor:
    """`ssd_scan` with x, B, C packed as Mamba-2's convolution outputs them: xBC
    (B, L, H * P + 2N), one B/C group, H = A's length -> y (B, L, H, P). The fused kernel
    reads the packed tensor and writes its gradient packed (no split, no concatenation).
    `kernel` is checked by `ssd_scan`, which every other value reaches."""
    nheads = A.size(0)
    if kernel == "fused" and resolve_backend(backend, xBC.device) == "triton":
        from models.ssd_triton import fused_ssd_packed

        return fused_ssd_packed(
            xBC, dt, A, nheads, d_state, chunk_size, D=D, dt_bias=dt_bias,
            dt_softplus=dt_softplus,
        )  # fmt: skip
    x, B, C = unpack_xbc(xBC, nheads, d_state)
    return ssd_scan(
        x, dt, A, B.unsqueeze(2), C.unsqueeze(2), chunk_size, D=D, dt_bias=dt_bias,
        dt_softplus=dt_softplus, backend=backend, kernel=kernel,
    )  # fmt: skip


def rmsnorm_gated(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    backend: str = "auto",
    kernel: str = "fused",
    z_bias: torch.Tensor | None = None,
    dz_into: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gated RMSNorm over the last axis (gate before norm), on the chosen backend; on the
    Triton backend `kernel` picks this project's row-tiled kernel or mamba-ssm's.
    `z_bias`: the bias of the product z comes from, added (and its gradient summed) by the
    fused kernel; `dz_into`: where the fused kernel writes z's gradient
    (models/split_gradient.py), ignored elsewhere."""
    check_ssd_kernel(kernel)
    if resolve_backend(backend, x.device) == "triton":
        if kernel == "fused":
            from models.gated_norm_triton import gated_rms_norm

            return gated_rms_norm(x, z, weight, eps, z_bias, dz_into)
        _, rmsnorm_fn = import_mamba_triton()
        z = z if z_bias is None else z + z_bias
        return rmsnorm_fn(x, weight, None, z=z, eps=eps, norm_before_gate=False)
    return rmsnorm_gated_reference(x, z, weight, eps, z_bias)


def causal_conv1d_hardswish_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """hardswish(causal depthwise conv of x + x_bias along L): x (B, L, C), weight
    (C, 1, K), bias and x_bias (C,)."""
    if x_bias is not None:
        x = x + x_bias
    K, length = weight.shape[-1], x.shape[1]
    conv = F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=x.shape[-1])
    return F.hardswish(conv[..., :length]).transpose(1, 2)  # (B, L, C)


def causal_conv1d_hardswish(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    backend: str = "auto",
    x_bias: torch.Tensor | None = None,
    dx_into: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, L, C) -> (B, L, C): one fused Triton kernel each way on the Triton backend
    (models/causal_conv_triton.py), nn.functional otherwise. `x_bias`: the bias of the
    product x comes from, added (and its gradient summed) by the kernels; `dx_into`:
    where the backward kernel writes x's gradient (models/split_gradient.py). Kernels
    wider than 4 (the Triton kernels' limit) run on nn.functional on every backend."""
    # 4: models/causal_conv_triton.TAPS
    if resolve_backend(backend, x.device) == "triton" and weight.shape[-1] <= 4:
        from models.causal_conv_triton import CausalConvHardswish

        return CausalConvHardswish.apply(x, weight, bias, x_bias, dx_into)
    return causal_conv1d_hardswish_reference(x, weight, bias, x_bias)


# --------------------------------------------------------------------------------------
# The time-aware SSD block
# --------------------------------------------------------------------------------------


class CausalConv1dHardswish(nn.Conv1d):
    """Hardswish of a depthwise convolution along L that sees only the current and K - 1
    earlier steps, on (B, L, C) tensors (`causal_conv1d_hardswish`). An nn.Conv1d for
    its parameters and their initialisation."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__(
            channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=True
        )

    def forward(
        self,
        x: torch.Tensor,
        backend: str = "auto",
        x_bias: torch.Tensor | None = None,
        dx_into: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return causal_conv1d_hardswish(x, self.weight, self.bias, backend, x_bias, dx_into)


class TiSSDBlock(nn.Module):
    """Mamba-2 (SSD) mixer whose step size dt is modulated by the time-gap signal T.

    Input u (B, L, d) and T (B, H, L); returns (out (B, L, d), T' (B, H, L)). With
    ``is_time=False`` the time path is absent and T passes through unchanged (SSD4Rec).
    With ``causal_time=True`` output position i depends on inputs 0..i only.
    """

    def __init__(
        self,
        d_model: int,
        max_seq_length: int,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 32,
        chunk_size: int = 32,
        norm_eps: float = 1e-5,
        is_time: bool = True,
        p2p_residual: bool = False,
        time_drop_out: float = 0.0,
        causal_time: bool = False,
        backend: str = "auto",
        ssd_kernel: str = "fused",
        product_kernel: str = "triton",
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % head_dim != 0:
            raise ValueError(
                f"head_dim ({head_dim}) must divide expand * hidden_size ({self.d_inner})"
            )
        self.d_state = d_state
        self.head_dim = head_dim
        self.nheads = self.d_inner // head_dim
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps
        self.is_time = is_time
        if backend not in BACKENDS:
            raise ValueError(f"ssd_backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.ssd_kernel = check_ssd_kernel(ssd_kernel)
        self.product_kernel = product_kernel  # for the bias-free products (`fuses_bias`)

        # [z | xBC | dt]: gate, conv input (x, B, C with one group), per-head step size
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads)
        conv_dim = self.d_inner + 2 * d_state
        self.conv1d = CausalConv1dHardswish(conv_dim, d_conv)

        # dt_bias = softplus^-1(dt0), dt0 log-uniform in [1e-3, 1e-1], as in Mamba-2.
        dt0 = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt0 = dt0.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model)

        if is_time:
            # causal_time: the time path's maps along L see only earlier positions, so the
            # block is causal end to end (needed to train on every position at once).
            if causal_time and not p2p_residual:
                raise ValueError(
                    "a causal time path needs p2p_residual: True (the per-head gate reads "
                    "the whole sequence)"
                )
            L = max_seq_length
            linear = LowerTriangularLinear if causal_time else partial(nn.Linear, L)
            self.time_conv_1 = CausalConv1dHardswish(self.nheads, d_conv)
            self.time_conv_2 = CausalConv1dHardswish(self.nheads, d_conv)
            self.time_mlp = nn.Sequential(Dropout(time_drop_out), linear(L), nn.SiLU(), linear(L))
            gate = linear(L) if p2p_residual else nn.Linear(L, 1)
            # gate logits; their sigmoid is applied by `time_mix_norm` (no parameters move:
            # the state dict keys of checkpoints with an nn.Sigmoid at index 2 are the same)
            self.time_gate = nn.Sequential(Dropout(time_drop_out), gate)
            self.time_norm = (PrefixLayerNorm if causal_time else nn.LayerNorm)(L)

    def forward(
        self, u: torch.Tensor, time_signal: torch.Tensor | None = None, out_bias: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`out_bias=False` leaves out_proj's bias for the caller to add (a fused residual
        norm adds it and sums its gradient in the same pass)."""
        batch, seqlen, _ = u.shape
        H, N = self.nheads, self.d_state
        widths = [self.d_inner, self.d_inner + 2 * N, H]
        # On the Triton backend with the fused kernels, the gated norm and the convolution
        # add in_proj's bias to the columns they read, and sum its gradient as they write
        # theirs: no reduction over in_proj's whole output gradient. They also write their
        # inputs' gradients into the columns of one gradient of in_proj's output: no
        # concatenation of the three blocks' gradients. z, xBC, dt: (B, L, d_in),
        # (B, L, d_in + 2N), (B, L, H).
        z_bias = xBC_bias = dz_into = dxBC_into = None
        if self.ssd_kernel == "fused" and fuses_bias(self.backend, u.device):
            zxbcdt = product(u, self.in_proj.weight, self.product_kernel)
            (z, xBC, dt), gradient = split_columns(zxbcdt, widths)
            dz_into, dxBC_into = partial(gradient.block, 0), partial(gradient.block, 1)
            z_bias, xBC_bias, dt_proj_bias = torch.split(self.in_proj.bias, widths)
            dt = dt + dt_proj_bias
        else:
            z, xBC, dt = torch.split(self.in_proj(u), widths, dim=-1)
        xBC = self.conv1d(xBC, self.backend, xBC_bias, dxBC_into)  # (B, L, d_in + 2N)

        theta = None
        if self.is_time:
            T = time_signal  # (B, H, L)
            gated = (T * self.time_mlp(T)).transpose(1, 2)  # (B, L, H)
            theta = self.time_conv_2(self.time_conv_1(gated, self.backend), self.backend)
            dt = dt * theta  # (B, L, H)
            theta = theta.transpose(1, 2)  # (B, H, L)

        y = ssd_scan_packed(
            xBC,
            dt,
            -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
            d_state=N,
            chunk_size=self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            backend=self.backend,
            kernel=self.ssd_kernel,
        )  # (B, L, H, P)
        y = rmsnorm_gated(
            y.reshape(batch, seqlen, self.d_inner),
            z,
            self.norm_weight,
            self.norm_eps,
            backend=self.backend,
            kernel=self.ssd_kernel,
            z_bias=z_bias,
            dz_into=dz_into,
        )
        if out_bias:
            out = self.out_proj(y)  # (B, L, d)
        else:
            out = product(y, self.out_proj.weight, self.product_kernel)  # (B, L, d)

        if not self.is_time:
            return out, time_signal
        gate_logits = self.time_gate(time_signal)  # (B, H, L) or (B, H, 1)
        # norm(s T + (1 - s) theta), s = sigmoid(gate_logits): (B, H, L)
        time_next = time_mix_norm(gate_logits, time_signal, theta, self.time_norm, self.backend)
        return out, time_next
