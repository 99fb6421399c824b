"""Linear recurrences in plain PyTorch: the parallel scan and Mamba-1's selective scan.

Both Mamba4Rec (real, input-dependent decay) and LRURec (complex, constant decay) run a
first-order linear recurrence along the sequence axis,

    h_t = a_t * h_{t-1} + b_t,    h_{-1} = 0,

elementwise over every other axis. `linear_scan` evaluates it with the odd/even
(Blelloch-style) parallel scan: log2(L) levels of tensor operations and O(L) work in all,
no Python step per position. Its gradient is the adjoint recurrence, run as a second
(reverse) scan. Real and complex tensors.

`selective_scan` is Mamba-1's selective SSM (Gu & Dao, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", 2023) with the argument layout of mamba-ssm's
`selective_scan_fn`; it is the path Mamba4Rec takes without the CUDA extension. Its
gradient is written out (adjoint scan) rather than traced by autograd, and on CPU it works
through blocks of batch rows whose (L, b, D, N) working set fits in cache: elementwise
passes over a 200 MB state tensor are bound by memory bandwidth, over a cache-sized block
they are not. `linear_scan_reference` and `selective_scan_reference` are the
step-by-step loops the tests compare against.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F

# Elements of one (L, b, D, N) block on CPU: 2**20 float32 = 4 MiB. Smaller blocks fit in
# cache better but mean more (tiny) operations, which thread pools handle badly.
CPU_BLOCK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------
# The linear recurrence h_t = a_t h_{t-1} + b_t
# --------------------------------------------------------------------------------------


def linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along `dim` (h_{-1} = 0), by a log-depth parallel scan.

    `a` broadcasts against `b` (e.g. a constant decay of shape (1, 1, H) for b (B, L, H));
    the result has the shape of the broadcast. Real or complex; differentiable.
    """
    a, b = torch.broadcast_tensors(a, b)
    h = _LinearScan.apply(a.movedim(dim, 0), b.movedim(dim, 0))
    return h.movedim(0, dim)


class _LinearScan(torch.autograd.Function):
    """The scan along axis 0, with its gradient as a second (reverse) scan.

    Autograd through the strided slices of `_scan` would allocate a zero tensor of the
    full size for every slice; the adjoint recurrence needs two tensors:
    g_t = dL/dh_t + conj(a_{t+1}) g_{t+1};  dL/db_t = g_t;  dL/da_t = g_t conj(h_{t-1}).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = _scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = ctx.saved_tensors
        g = _reverse_scan(a.conj(), grad_h)
        return g * _shift_right(h).conj(), g


def _scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The recurrence along axis 0: combine neighbouring pairs, recurse on half, fill in."""
    length = b.shape[0]
    if length == 1:
        return b.clone()
    n_odd = length // 2
    a_even, a_odd = a[0::2], a[1::2]  # steps 0, 2, 4, ... and 1, 3, 5, ...
    b_even, b_odd = b[0::2], b[1::2]
    # Step 2k+1 from h_{2k-1}: h_{2k+1} = (a_{2k+1} a_{2k}) h_{2k-1} + (a_{2k+1} b_{2k} + b_{2k+1})
    h_odd = _scan(a_odd * a_even[:n_odd], torch.addcmul(b_odd, a_odd, b_even[:n_odd]))
    h = torch.empty_like(b)
    h[1::2] = h_odd  # h_1, h_3, ...
    # Even steps from the odd ones before them: h_{2k} = a_{2k} h_{2k-1} + b_{2k}, h_0 = b_0.
    h[0] = b[0]
    h[2::2] = torch.addcmul(b_even[1:], a_even[1:], h_odd[: a_even.shape[0] - 1])
    return h


def _reverse_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """g_t = b_t + a_{t+1} g_{t+1} along axis 0 (g_L = 0): the adjoint of `_scan`."""
    a_next = torch.cat([a[1:], torch.zeros_like(a[:1])])
    return _scan(a_next.flip(0), b.flip(0)).flip(0)


def _shift_right(h: torch.Tensor) -> torch.Tensor:
    """h_{t-1} along axis 0, with h_{-1} = 0."""
    return torch.cat([torch.zeros_like(h[:1]), h[:-1]])


def linear_scan_reference(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The same recurrence as a Python loop over the steps (for tests)."""
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    state = torch.zeros_like(b[0])
    out = []
    for t in range(b.shape[0]):
        state = a[t] * state + b[t]
        out.append(state)
    return torch.stack(out).movedim(0, dim)


# --------------------------------------------------------------------------------------
# Mamba-1 selective scan
# --------------------------------------------------------------------------------------


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba-1's selective scan; arguments as mamba-ssm's `selective_scan_fn`.

    u, delta, z (B, D, L); A (D, N) real; B, C (B, N, L) (input-dependent, shared by all D
    channels); D, delta_bias (D). With delta_t = softplus(delta_t + delta_bias) and the state
    h_t in R^{D x N}:

        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t
        y_t = h_t C_t + D u_t,    y <- y * silu(z)

    Returns y (B, D, L) in u's dtype. `backend`: "torch" (this module's parallel scan),
    "triton" (`models.selective_scan_triton`, float32 on CUDA), or "auto" (Triton on
    CUDA when it is installed, else PyTorch).
    """
    out_dtype = u.dtype
    u, delta, dtype = _discretize(u, delta, A, delta_bias, delta_softplus)
    scan = scan_function(backend, u)
    y = scan.apply(u, delta, A.to(dtype), B.to(dtype), C.to(dtype))  # (B, D, L)
    return _epilogue(y, u, D, z, dtype).to(out_dtype)


SCAN_BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_scan_available() -> bool:
    """True when Triton (and so `models.selective_scan_triton`) can be imported."""
    try:
        importlib.import_module("models.selective_scan_triton")
    except Exception:  # ImportError, or a Triton that cannot initialise here
        return False
    return True


def scan_function(backend: str, u: torch.Tensor) -> type[torch.autograd.Function]:
    """The autograd Function that runs the scan for `backend` on `u`'s device and dtype."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"selective scan backend must be one of {SCAN_BACKENDS}, got {backend!r}")
    # The Triton interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, for tests.
    runs_triton = u.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton":
        if not (runs_triton and u.dtype == torch.float32 and triton_scan_available()):
            raise ValueError(
                "the Triton selective scan needs float32 CUDA tensors and Triton installed; "
                f"got {u.dtype} on {u.device}; use backend 'torch' or 'auto'"
            )
    elif backend == "torch" or not (
        u.is_cuda and u.dtype == torch.float32 and triton_scan_available()
    ):
        return _SelectiveScan
    from models.selective_scan_triton import TritonSelectiveScan

    return TritonSelectiveScan


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t for the recurrence above, blockwise over batch rows.

    Keeps each block's decays and states for the backward pass, which runs the adjoint
    recurrence g_t = y'_t C_t + exp(delta_{t+1} A) g_{t+1} as a reverse scan.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # (B, D, L), (B, D, L), (D, N), (B, N, L), (B, N, L)
        y = torch.empty_like(u)
        ctx.blocks = []
        for rows in _row_blocks(u, A):
            decay, states = _block_states(u[rows], delta[rows], A, B[rows])  # (L, b, D, N)
            y[rows] = torch.einsum("lbdn,bnl->bdl", states, C[rows])
            ctx.blocks.append((rows, decay, states))
        ctx.save_for_backward(u, delta, A, B, C)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C = ctx.saved_tensors
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        for rows, decay, states in ctx.blocks:
            grads = _block_backward(
                u[rows], delta[rows], A, B[rows], C[rows], grad_y[rows], decay, states
            )
            grad_u[rows], grad_delta[rows], block_grad_A, grad_B[rows], grad_C[rows] = grads
            grad_A += block_grad_A
        ctx.blocks = None
        return grad_u, grad_delta, grad_A, grad_B, grad_C


def _row_blocks(u: torch.Tensor, A: torch.Tensor) -> list[slice]:
    """Batch-row blocks: cache-sized on CPU, the whole batch on accelerators."""
    batch, channels, seqlen = u.shape
    if u.device.type != "cpu":
        return [slice(0, batch)]
    rows = max(1, CPU_BLOCK_ELEMENTS // (seqlen * channels * A.shape[1]))
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]


def _block_states(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays exp(delta A) and states h, both (L, b, D, N), step-major."""
    delta_t = delta.permute(2, 0, 1)[..., None]  # (L, b, D, 1)
    decay = torch.exp(delta_t * A)  # (L, b, D, N)
    drive = (delta_t * u.permute(2, 0, 1)[..., None]) * B.permute(2, 0, 1)[:, :, None, :]
    return decay, _scan(decay, drive)


def _block_backward(u, delta, A, B, C, grad_y, decay, states):
    """Gradients of y = C . h w.r.t. (u, delta, A, B, C) for one block of rows."""
    B_t = B.permute(2, 0, 1)[:, :, None, :]  # (L, b, 1, N)
    C_t = C.permute(2, 0, 1)[:, :, None, :]
    grad_y_t = grad_y.permute(2, 0, 1)  # (L, b, D)
    grad_C = torch.einsum("lbdn,lbd->bnl", states, grad_y_t)
    adjoint = _reverse_scan(decay, grad_y_t[..., None] * C_t)  # dL/d(drive_t), (L, b, D, N)
    # decay = exp(delta A): dL/d(delta A) = dL/d(decay) * decay, dL/d(decay_t) = g_t h_{t-1}
    grad_exponent = adjoint * _shift_right(states) * decay
    delta_t, u_t = delta.permute(2, 0, 1), u.permute(2, 0, 1)  # (L, b, D)
    grad_du = (adjoint * B_t).sum(-1)  # drive = (delta u) B: dL/d(delta u), (L, b, D)
    grad_B = torch.einsum("lbdn,lbd->bnl", adjoint, delta_t * u_t)
    grad_delta = (grad_exponent * A).sum(-1) + grad_du * u_t
    grad_A = torch.einsum("lbdn,lbd->dn", grad_exponent, delta_t)
    grad_u = grad_du * delta_t
    return (
        grad_u.permute(1, 2, 0),
        grad_delta.permute(1, 2, 0),
        grad_A,
        grad_B,
        grad_C,
    )


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """`selective_scan` as a loop over the L steps with an explicit (B, D, N) state."""
    out_dtype = u.dtype
    u, delta, dtype = _discretize(u, delta, A, delta_bias, delta_softplus)
    A, B, C = A.to(dtype), B.to(dtype), C.to(dtype)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, D, N)
    ys = []
    for t in range(u.shape[2]):
        d_t = delta[:, :, t, None]  # (B, D, 1)
        state = torch.exp(d_t * A) * state + d_t * u[:, :, t, None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    return _epilogue(y, u, D, z, dtype).to(out_dtype)


def _discretize(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Common prologue: compute dtype, and the positive step size delta (B, D, L)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"selective_scan expects u and delta of shape (B, D, L), got {tuple(u.shape)} "
            f"and {tuple(delta.shape)}"
        )
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A must be (D, N) with D = {u.shape[1]}, got {tuple(A.shape)}")
    dtype = torch.promote_types(u.dtype, torch.float32)  # float32 at least, float64 kept
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(dtype), delta, dtype


def _epilogue(
    y: torch.Tensor,
    u: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Skip connection D u and the SiLU gate on z."""
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y
