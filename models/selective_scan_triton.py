"""Mamba-1's selective scan as two Triton kernels (forward, backward), for CUDA.

The PyTorch path (`models.selective_scan`) materialises decays and states of shape
(L, B, D, N) in several elementwise passes each way; here one program per (batch row,
block of channels) walks the sequence with its (D_blk, N) state in registers:

    h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t,    y_t = h_t . C_t

The forward pass writes each step's state once (float32, (B, L, D, N)) when a gradient
is needed; the backward pass walks the sequence in reverse with the adjoint state
G_t = dy_t C_t + exp(delta_{t+1} A) G_{t+1}, reading those states back. Channel blocks
write partial sums of dB and dC (reduced over channels) and each batch row a partial dA;
PyTorch adds them up. Inputs in any strides; float32 arithmetic.

Same function and argument layout as `models.selective_scan._SelectiveScan`, which the
tests compare this against (tests/test_baseline_layers.py, on CUDA or under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.triton_launch import COMPILE_OPTIONS


@triton.jit
def _selective_scan_fwd(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, h_ptr,
    D, N,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_y_b, s_y_d, s_y_l,
    L: tl.constexpr, STORE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # (D_blk, N)
    state_rows = (b * L * D + offs_d[:, None]) * N + offs_n[None, :]  # h[b, 0, d, n]
    for t in range(L):
        u = tl.load(u_ptr + b * s_u_b + offs_d * s_u_d + t * s_u_l, mask=mask_d, other=0.0)
        dt = tl.load(dt_ptr + b * s_dt_b + offs_d * s_dt_d + t * s_dt_l, mask=mask_d, other=0.0)
        B_t = tl.load(B_ptr + b * s_B_b + offs_n * s_B_n + t * s_B_l, mask=mask_n, other=0.0)
        C_t = tl.load(C_ptr + b * s_C_b + offs_n * s_C_n + t * s_C_l, mask=mask_n, other=0.0)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B_t[None, :]
        y = tl.sum(h * C_t[None, :], axis=1)  # (D_blk,)
        tl.store(y_ptr + b * s_y_b + offs_d * s_y_d + t * s_y_l, y, mask=mask_d)
        if STORE_STATES:
            tl.store(h_ptr + state_rows + t * D * N, h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, h_ptr, dy_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr,
    batch, D, N,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_dy_b, s_dy_d, s_dy_l,
    s_du_b, s_du_d, s_du_l,
    s_ddt_b, s_ddt_d, s_ddt_l,
    L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
    state_rows = (b * L * D + offs_d[:, None]) * N + offs_n[None, :]
    # dB, dC partials: (n_blocks, batch, L, N), one slice per channel block
    partial_rows = (block * batch + b) * L * N + offs_n
    carried = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # exp(delta_{t+1} A) G_{t+1}
    grad_A = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    h = tl.load(h_ptr + state_rows + (L - 1) * D * N, mask=mask_dn, other=0.0)  # h_{L-1}
    for i in range(L):
        t = L - 1 - i
        u = tl.load(u_ptr + b * s_u_b + offs_d * s_u_d + t * s_u_l, mask=mask_d, other=0.0)
        dt = tl.load(dt_ptr + b * s_dt_b + offs_d * s_dt_d + t * s_dt_l, mask=mask_d, other=0.0)
        B_t = tl.load(B_ptr + b * s_B_b + offs_n * s_B_n + t * s_B_l, mask=mask_n, other=0.0)
        C_t = tl.load(C_ptr + b * s_C_b + offs_n * s_C_n + t * s_C_l, mask=mask_n, other=0.0)
        dy = tl.load(dy_ptr + b * s_dy_b + offs_d * s_dy_d + t * s_dy_l, mask=mask_d, other=0.0)
        h_prev = tl.load(
            h_ptr + state_rows + (t - 1) * D * N, mask=mask_dn & (t > 0), other=0.0
        )  # h_{t-1}, zero before the first step
        G = carried + dy[:, None] * C_t[None, :]  # dL/dh_t
        tl.store(dC_ptr + partial_rows + t * N, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
        decay = tl.exp(dt[:, None] * A)
        grad_exponent = G * h_prev * decay  # dL/d(delta_t A)
        grad_A += grad_exponent * dt[:, None]
        grad_drive = tl.sum(G * B_t[None, :], axis=1)  # dL/d(delta_t u_t), (D_blk,)
        grad_dt = tl.sum(grad_exponent * A, axis=1) + grad_drive * u
        tl.store(du_ptr + b * s_du_b + offs_d * s_du_d + t * s_du_l, grad_drive * dt, mask=mask_d)
        tl.store(ddt_ptr + b * s_ddt_b + offs_d * s_ddt_d + t * s_ddt_l, grad_dt, mask=mask_d)
        grad_B = tl.sum(G * (dt * u)[:, None], axis=0)  # (N,)
        tl.store(dB_ptr + partial_rows + t * N, grad_B, mask=mask_n)
        carried = decay * G
        h = h_prev
    tl.store(dA_ptr + (b * D + offs_d[:, None]) * N + offs_n[None, :], grad_A, mask=mask_dn)


def _blocks(channels: int, state: int) -> tuple[int, int, int]:
    """Channel block, state block (powers of two) and warps for a (D, N) state."""
    block_n = triton.next_power_of_2(state)
    block_d = min(triton.next_power_of_2(channels), max(16, 2048 // block_n))
    return block_d, block_n, 4


class TritonSelectiveScan(torch.autograd.Function):
    """y (B, D, L) = C . h for u, delta (B, D, L); A (D, N); B, C (B, N, L); all float32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, channels, seqlen = u.shape
        state = A.shape[1]
        block_d, block_n, warps = _blocks(channels, state)
        # y with the channel axis innermost, like u from a (B, L, D) projection: coalesced stores
        y = torch.empty(batch, seqlen, channels, device=u.device, dtype=torch.float32)
        y = y.transpose(1, 2)
        store = any(ctx.needs_input_grad)  # grad mode is off inside forward itself
        states = (
            torch.empty(batch, seqlen, channels, state, device=u.device, dtype=torch.float32)
            if store
            else y  # unused
        )
        grid = (batch, triton.cdiv(channels, block_d))
        _selective_scan_fwd[grid](
            u, delta, A, B, C, y, states,
            channels, state,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *y.stride(),
            L=seqlen, STORE_STATES=store, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps,
            **COMPILE_OPTIONS,
        )  # fmt: skip
        if store:
            ctx.save_for_backward(u, delta, A, B, C, states)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, states = ctx.saved_tensors
        batch, channels, seqlen = u.shape
        state = A.shape[1]
        block_d, block_n, warps = _blocks(channels, state)
        n_blocks = triton.cdiv(channels, block_d)
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_A = A.new_empty(batch, channels, state)
        grad_B = u.new_empty(n_blocks, batch, seqlen, state)
        grad_C = u.new_empty(n_blocks, batch, seqlen, state)
        _selective_scan_bwd[(batch, n_blocks)](
            u, delta, A, B, C, states, grad_y,
            grad_u, grad_delta, grad_A, grad_B, grad_C,
            batch, channels, state,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
            *grad_y.stride(), *grad_u.stride(), *grad_delta.stride(),
            L=seqlen, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps, **COMPILE_OPTIONS,
        )  # fmt: skip
        grad_B = grad_B.sum(0).transpose(1, 2)  # (B, N, L)
        grad_C = grad_C.sum(0).transpose(1, 2)
        return grad_u, grad_delta, grad_A.sum(0), grad_B, grad_C
