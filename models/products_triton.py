"""The block's and FFN's float32 matrix products, Y = X W^T and dX = dY W, as Triton
kernels on the tensor cores; the weight gradient stays on cuBLAS.

TiM4Rec's products reduce over K <= 256 (in_proj 64 -> 324, out_proj 128 -> 64, the FFN
64 -> 256 -> 64) across ~120,000 rows. In float32 cuBLAS runs them on the FP32 units
(RecBole's "highest" matmul precision) at 25-40 TFLOP/s on an H200. Here the float32
operands multiply as `tf32x3`: each split into a TF32 high part and a TF32 remainder,
three tensor-core products summed in float32 (relative error ~1e-6, as float32 FMAs;
plain TF32 would be ~1e-3). Measured per product on an H200 (docs/performance_notes.md,
"Float32 products on Triton" and "Products: rows held, W transposed"): the forwards
beat cuBLAS by 1.6-1.7x, the input gradients of out_proj and the FFN by 1.3-1.6x
(in_proj's is cuBLAS's, 9% faster there), the weight gradient (a reduction over all
rows) lost 1.3-2.9x in two attempts and is cuBLAS's, and bf16 products are cuBLAS's
(faster there).

- forward, "tiles": each program a (BLOCK_M, BLOCK_N) tile of Y, walking K in blocks;
- forward, "rows": each program a block of rows with all of K held, walking N, so X is
  read once (wide outputs: in_proj, the FFN's W1);
- dX = dY W: each program a block of rows with all of K, walking N; W as stored ("w") or
  as W^T ("wt"): then both operands reduce along their unit stride, the layout the
  tensor cores take TF32 in; in_proj's (N = 324) on cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.split_gradient import padded_empty
from models.triton_vectors import as_rows

MAX_K = 256  # the widest reduction a dX program holds whole


@triton.jit
def _product_fwd(
    x_ptr, w_ptr, y_ptr, M, N, N_OUT, K, s_xm, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[rows, cols] = x[rows, :] @ w[cols, :]^T, w (N, K) contiguous, K in blocks; the
    columns N..N_OUT (the rows' padding) written as zeros."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + r64 * s_xm + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :])
        w = tl.load(
            w_ptr + cols[:, None] * K + ks[None, :],
            mask=(cols < N)[:, None] & (ks < K)[None, :],
            other=0.0,
        )
        acc += tl.dot(x, tl.trans(w), input_precision="tf32x3")
    mask = (rows < M)[:, None] & (cols < N_OUT)[None, :]
    tl.store(y_ptr + r64 * s_ym + cols[None, :], acc, mask=mask)


@triton.jit
def _product_fwd_rows(
    x_ptr, w_ptr, y_ptr, M, N, N_OUT, K, s_xm, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[rows, :] = x[rows, :] @ w^T, all of K (<= BLOCK_K) held, walking N in blocks; the
    columns N..N_OUT (the rows' padding) written as zeros."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * s_xm + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :])
    for n0 in range(0, N_OUT, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        w = tl.load(
            w_ptr + cols[:, None] * K + ks[None, :],
            mask=(cols < N)[:, None] & (ks < K)[None, :],
            other=0.0,
        )
        y = tl.dot(x, tl.trans(w), input_precision="tf32x3")
        mask = (rows < M)[:, None] & (cols < N_OUT)[None, :]
        tl.store(y_ptr + r64 * s_ym + cols[None, :], y, mask=mask)


@triton.jit
def _product_dx(
    dy_ptr, w_ptr, dx_ptr, M, N, K, s_dym, s_dxm, s_w,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """dx[rows, :] = dy[rows, :] @ w, walking N in blocks, all of K in one block; w (N, K)
    with rows of stride s_w, or W_TRANSPOSED: w^T (K, N) with rows of stride s_w."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + r64 * s_dym + cols[None, :], mask=(rows < M)[:, None] & (cols < N)[None, :]
        )
        if W_TRANSPOSED:
            w_t = tl.load(
                w_ptr + ks[:, None] * s_w + cols[None, :],
                mask=(ks < K)[:, None] & (cols < N)[None, :],
            )
            w = tl.trans(w_t)
        else:
            w = tl.load(
                w_ptr + cols[:, None] * s_w + ks[None, :],
                mask=(cols < N)[:, None] & (ks < K)[None, :],
            )
        acc += tl.dot(dy, w, input_precision="tf32x3")
    mask = (rows < M)[:, None] & (ks < K)[None, :]
    tl.store(dx_ptr + r64 * s_dxm + ks[None, :], acc, mask=mask)


def _block_k(k: int) -> int:
    if k > MAX_K:
        raise ValueError(f"Triton products reduce over at most {MAX_K} columns, got {k}")
    return max(16, triton.next_power_of_2(k))  # tl.dot needs 16 or more


# Launch configurations `benchmarks/linear_products.py --sweep` tries: (variant, BLOCK_M,
# BLOCK_N, BLOCK_K or None for all of K, warps, stages).
SWEEP = {
    "fwd": [("tiles", 64, 64, 32, 4, 3), ("tiles", 128, 64, 32, 4, 3), ("tiles", 64, 128, 64, 4, 2),
            ("rows", 64, 64, None, 4, 3), ("rows", 128, 64, None, 4, 2),
            ("rows", 128, 64, None, 8, 2), ("rows", 32, 64, None, 4, 2)],
    "dx": [("w", 32, 32, None, 4, 3), ("w", 128, 32, None, 8, 3), ("wt", 32, 32, None, 4, 3),
           ("wt", 64, 32, None, 4, 3), ("wt", 64, 32, None, 4, 4), ("wt", 128, 32, None, 8, 3),
           ("wt", 64, 64, None, 4, 3)],
}  # fmt: skip


def sweep_configs(op: str, k: int, n: int) -> list[dict]:
    """SWEEP[op] as launch configurations of a product k -> n ("rows" only where it holds
    all of K, k <= 128)."""
    return [
        dict(variant=v, BLOCK_M=m, BLOCK_N=bn, BLOCK_K=block_k or _block_k(k),
             num_warps=w, num_stages=s)
        for v, m, bn, block_k, w, s in SWEEP[op]
        if v != "rows" or k <= 128
    ]  # fmt: skip


def launch_config(op: str, k: int, n: int) -> dict:
    """Kernel variant, block sizes and warps of `op` ("fwd" or "dx") for a product k -> n:
    the fastest of the sweep on an H200 (docs/performance_notes.md, "Products: rows held,
    W transposed"). Wide outputs of narrow inputs (in_proj, W1) hold rows and walk N;
    input gradients over N a multiple of 32 read W transposed; in_proj's (K = 64, N = 324)
    is cuBLAS's, which beat both Triton variants there."""
    if op == "fwd":
        if k <= 64 and n > 64:
            return dict(variant="rows", BLOCK_M=128, BLOCK_N=64, BLOCK_K=_block_k(k),
                        num_warps=4, num_stages=2)  # fmt: skip
        return dict(variant="tiles", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    if n % 32 == 0 and k <= 64:
        return dict(variant="wt", BLOCK_M=128, BLOCK_N=32, BLOCK_K=_block_k(k),
                    num_warps=8, num_stages=3)  # fmt: skip
    if n % 32 == 0 and k <= 128:
        return dict(variant="wt", BLOCK_M=64, BLOCK_N=32, BLOCK_K=_block_k(k),
                    num_warps=4, num_stages=3)  # fmt: skip
    if k <= 64:
        return dict(variant="cublas")
    return dict(variant="w", BLOCK_M=32, BLOCK_N=32, BLOCK_K=_block_k(k), num_warps=4, num_stages=3)


def product_fwd(x2: torch.Tensor, w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x2 (M, K) @ w (N, K)^T -> (M, N), float32; `config` overrides launch_config's
    (benchmarks/linear_products.py --sweep)."""
    M, K = x2.shape
    N = w.shape[0]
    config = dict(config or launch_config("fwd", K, N))
    y = padded_empty((M, N), torch.float32, x2.device)
    # The padding is written too, as zeros: a store masked at in_proj's 324 columns does not
    # vectorise (its forward on an H200: 149 us masked at 324, 117 us at 336;
    # docs/performance_notes.md, "Products: rows held").
    n_out = y.stride(0)
    if config.pop("variant") == "rows":
        grid = (triton.cdiv(M, config["BLOCK_M"]),)
        _product_fwd_rows[grid](x2, w, y, M, N, n_out, K, x2.stride(0), y.stride(0), **config)
    else:
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(n_out, config["BLOCK_N"]))
        _product_fwd[grid](x2, w, y, M, N, n_out, K, x2.stride(0), y.stride(0), **config)
    return y


def product_dx(dy2: torch.Tensor, w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """dy2 (M, N) @ w (N, K) -> (M, K), float32; on cuBLAS where launch_config says so."""
    M, N = dy2.shape
    K = w.shape[1]
    config = dict(config or launch_config("dx", K, N))
    variant = config.pop("variant")
    if variant == "cublas":
        return dy2 @ w
    transposed = variant == "wt"
    w_op = w.t().contiguous() if transposed else w
    dx = torch.empty(M, K, device=dy2.device, dtype=torch.float32)
    grid = (triton.cdiv(M, config["BLOCK_M"]),)
    _product_dx[grid](
        dy2, w_op, dx, M, N, K, dy2.stride(0), dx.stride(0), w_op.stride(0),
        W_TRANSPOSED=transposed, **config,
    )  # fmt: skip
    return dx


class TritonProduct(torch.autograd.Function):
    """x (..., K) @ weight (N, K)^T in float32, without bias (the fused kernels add the
    biases): Triton forward, input gradient by `product_dx`, cuBLAS weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or weight.dtype != torch.float32:
            raise ValueError(f"Triton products take float32, got {x.dtype} and {weight.dtype}")
        _block_k(x.shape[-1])
        x2, w = as_rows(x), weight.contiguous()
        ctx.save_for_backward(x2, w)
        ctx.shape = x.shape
        return product_fwd(x2, w).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w = ctx.saved_tensors
        dy2 = as_rows(dy)
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            dx = product_dx(dy2, w).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            dweight = dy2.t() @ x2  # (N, K)
        return dx, dweight


def triton_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T, float32, K <= MAX_K (module docstring)."""
    return TritonProduct.apply(x, weight)
