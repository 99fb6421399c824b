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

Candidates of the sweep, not yet timed on a GPU (docs/performance_notes.md, "bf16x6
products, prepared"): "bf16x6", each operand split into three bfloat16 parts and six
tensor-core products summed in float32 (`_dot_bf16x6`, float32's accuracy), for the
weight gradient (`_product_dw`, split over rows) and the input gradient through W as
stored ("w6"). The tensor cores take bfloat16 operands in either major order, so the
reduction over the rows, the strided axis of both dW operands, needs no transposed copy.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from models.split_gradient import padded_empty
from models.triton_launch import COMPILE_OPTIONS
from models.triton_vectors import as_rows

MAX_K = 256  # the widest reduction a dX program holds whole


@triton.jit
def _bf16_parts(v):
    """v (float32) as hi + mid + lo, three bfloat16 numbers of 8 significant bits each: 24
    together, float32's own (the two subtractions are exact)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _dot_bf16x6(a, b, acc, TRANSPOSE_A: tl.constexpr):
    """acc + a @ b (a^T @ b if TRANSPOSE_A) for float32 a, b as six bfloat16 products of
    their three-way splits (the terms down to 2^-16 of the leading one; mid*lo, lo*mid and
    lo*lo, 2^-24 and below, left out): float32's accuracy at the bfloat16 tensor cores'
    rate / 6, with operands reduced along either axis (TF32 takes only K-major ones)."""
    a_hi, a_mid, a_lo = _bf16_parts(a)
    b_hi, b_mid, b_lo = _bf16_parts(b)
    if TRANSPOSE_A:  # after the split: 174 registers instead of 251 (sm_90, 64 x 64 tiles)
        a_hi, a_mid, a_lo = tl.trans(a_hi), tl.trans(a_mid), tl.trans(a_lo)
    acc = tl.dot(a_mid, b_mid, acc)  # smallest terms first
    acc = tl.dot(a_lo, b_hi, acc)
    acc = tl.dot(a_hi, b_lo, acc)
    acc = tl.dot(a_mid, b_hi, acc)
    acc = tl.dot(a_hi, b_mid, acc)
    return tl.dot(a_hi, b_hi, acc)


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
    W_TRANSPOSED: tl.constexpr, BF16X6: tl.constexpr,
):  # fmt: skip
    """dx[rows, :] = dy[rows, :] @ w, walking N in blocks, all of K in one block; w (N, K)
    with rows of stride s_w, or W_TRANSPOSED: w^T (K, N) with rows of stride s_w; in
    tf32x3, or in bf16x6 (`_dot_bf16x6`), which takes w as stored on the tensor cores."""
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
        if BF16X6:
            acc = _dot_bf16x6(dy, w, acc, TRANSPOSE_A=False)
        else:
            acc += tl.dot(dy, w, input_precision="tf32x3")
    mask = (rows < M)[:, None] & (ks < K)[None, :]
    tl.store(dx_ptr + r64 * s_dxm + ks[None, :], acc, mask=mask)


@triton.jit
def _product_dw(
    dy_ptr, x_ptr, part_ptr, M, N, K, s_dym, s_xm, ROWS_PER_SPLIT,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """part[split, n, k] = sum over the split's rows r of dy[r, n] x[r, k], in bf16x6. The
    sum runs over the strided axis of both operands, which the tensor cores take in
    bfloat16 but not in TF32. Programs of one split are adjacent in the grid, so the N
    tiles of a row block share its reads of x in L2."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    cols_n = (tile % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = (tile // n_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    start = split * ROWS_PER_SPLIT
    for r0 in range(start, tl.minimum(start + ROWS_PER_SPLIT, M), BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(
            dy_ptr + r64 * s_dym + cols_n[None, :],
            mask=(rows < M)[:, None] & (cols_n < N)[None, :],
            other=0.0,
        )  # (BLOCK_R, BLOCK_N)
        x = tl.load(
            x_ptr + r64 * s_xm + cols_k[None, :],
            mask=(rows < M)[:, None] & (cols_k < K)[None, :],
            other=0.0,
        )  # (BLOCK_R, BLOCK_K)
        acc = _dot_bf16x6(dy, x, acc, TRANSPOSE_A=True)
    out = part_ptr + split * N * K + cols_n[:, None] * K + cols_k[None, :]
    tl.store(out, acc, mask=(cols_n < N)[:, None] & (cols_k < K)[None, :])


@functools.cache
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: Triton's interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


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
           ("wt", 64, 64, None, 4, 3), ("w6", 64, 32, None, 4, 3), ("w6", 128, 32, None, 8, 3),
           ("w6", 64, 64, None, 4, 3)],
    # dW: (variant, BLOCK_R rows, BLOCK_N, BLOCK_K, warps, stages, waves of programs)
    "dw": [("bf16x6", 64, 64, 64, 4, 3, 4), ("bf16x6", 32, 64, 64, 4, 3, 4),
           ("bf16x6", 64, 128, 64, 8, 3, 4), ("bf16x6", 64, 64, 128, 8, 3, 4),
           ("bf16x6", 64, 64, 64, 4, 3, 2), ("bf16x6", 64, 64, 64, 4, 3, 8)],
}  # fmt: skip


def sweep_configs(op: str, k: int, n: int) -> list[dict]:
    """SWEEP[op] as launch configurations of a product k -> n ("rows" only where it holds
    all of K, k <= 128)."""
    if op == "dw":
        return [
            dict(variant=v, BLOCK_R=r, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s,
                 waves=waves)
            for v, r, bn, bk, w, s, waves in SWEEP[op]
        ]  # fmt: skip
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
    if op == "dw":  # bf16x6 is a candidate of the sweep, not yet timed on a GPU
        return dict(variant="cublas")
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
        _product_fwd_rows[grid](
            x2, w, y, M, N, n_out, K, x2.stride(0), y.stride(0), **config, **COMPILE_OPTIONS
        )
    else:
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(n_out, config["BLOCK_N"]))
        _product_fwd[grid](
            x2, w, y, M, N, n_out, K, x2.stride(0), y.stride(0), **config, **COMPILE_OPTIONS
        )
    return y


def product_dw(dy2: torch.Tensor, x2: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """dy2 (M, N)^T @ x2 (M, K) -> (N, K), float32; on cuBLAS where launch_config says so.
    The rows are split over `waves` x the SMs' worth of programs, each writing its partial
    sum; the partials are added in a fixed order (deterministic)."""
    M, N = dy2.shape
    K = x2.shape[1]
    config = dict(config or launch_config("dw", K, N))
    if config.pop("variant") == "cublas":
        return dy2.t() @ x2
    tiles = triton.cdiv(N, config["BLOCK_N"]) * triton.cdiv(K, config["BLOCK_K"])
    programs = config.pop("waves") * _processors(dy2.device)
    rows_per_split = triton.cdiv(M, max(1, programs // tiles))
    rows_per_split = triton.cdiv(rows_per_split, config["BLOCK_R"]) * config["BLOCK_R"]
    splits = triton.cdiv(M, rows_per_split)
    partials = torch.empty(splits, N, K, device=dy2.device, dtype=torch.float32)
    _product_dw[(tiles, splits)](
        dy2, x2, partials, M, N, K, dy2.stride(0), x2.stride(0), rows_per_split,
        **config, **COMPILE_OPTIONS,
    )  # fmt: skip
    return partials[0] if splits == 1 else partials.sum(0)


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
    bf16x6 = variant == "w6"
    dx = torch.empty(M, K, device=dy2.device, dtype=torch.float32)
    grid = (triton.cdiv(M, config["BLOCK_M"]),)
    _product_dx[grid](
        dy2, w_op, dx, M, N, K, dy2.stride(0), dx.stride(0), w_op.stride(0),
        W_TRANSPOSED=transposed, BF16X6=bf16x6, **config, **COMPILE_OPTIONS,
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
            dweight = product_dw(dy2, x2)  # (N, K)
        return dx, dweight


def triton_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T, float32, K <= MAX_K (module docstring)."""
    return TritonProduct.apply(x, weight)
