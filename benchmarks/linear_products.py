"""cuBLAS on the TiM4Rec block's matrix products at the ML-1M all-positions step's shape:
GPU microseconds per product forward, input gradient, weight gradient and bias gradient
(PyTorch's sum), float32 and bfloat16, with the rate each reaches (TFLOP/s, and TB/s of
the bytes it must move: both operands read, the result written once).

These products run outside the fused kernels, so they bound how close to the floor the
step can get (docs/performance_notes.md, "Why the floor is out of reach").

    python -m benchmarks.linear_products                    # 120,000 rows, d = 64
    python -m benchmarks.linear_products --blas cublaslt
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from benchmarks import measure
from benchmarks.floor import StepShape, product_shapes

CALLS = 30


def time_us(fn: Callable[[], object], device: torch.device) -> float:
    """Median GPU microseconds per call (benchmarks.measure.time_calls), after a warm-up."""
    for _ in range(5):
        fn()
    return 1e6 * statistics.median(measure.time_calls(fn, device, CALLS))


def layer_products(hidden: int) -> list[tuple[str, int, int]]:
    """(name, k, n) of one layer's products Y (rows x n) = X (rows x k) W^T at width
    `hidden` (benchmarks/floor.py's product_shapes, the time path's and scoring left out)."""
    shape = StepShape(batch=1, seq_len=1, n_items=1, num_layers=1, hidden=hidden)
    names = ("in_proj", "out_proj", "ffn W1", "ffn W2")
    products = [p for p in product_shapes(shape) if p[0] in ("in_proj", "out_proj", "ffn")]
    return [(name, k, n) for name, (_, _, k, n) in zip(names, products)]


def measure_product(rows: int, k: int, n: int, dtype: torch.dtype, device) -> dict[str, float]:
    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    dy = torch.randn(rows, n, device=device, dtype=dtype)
    return {
        "forward": time_us(lambda: x @ w.t(), device),
        "dX": time_us(lambda: dy @ w, device),
        "dW": time_us(lambda: dy.t() @ x, device),
        "bias sum": time_us(lambda: dy.sum(0, dtype=torch.float32), device),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120_000, help="positions per step")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blas", choices=("cublas", "cublaslt"), default="cublas")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.preferred_blas_library(args.blas)
    print(f"{torch.cuda.get_device_name()}, {args.blas}, {args.rows:,} rows; GPU us per call")
    print("| product | dtype | forward | dX | dW | bias sum | TFLOP/s fwd / dX / dW | TB/s fwd |")
    print("|---|---|---|---|---|---|---|---|")
    total = {}
    for dtype in (torch.float32, torch.bfloat16):
        name_dtype = str(dtype).removeprefix("torch.")
        for name, k, n in layer_products(args.hidden):
            us = measure_product(args.rows, k, n, dtype, device)
            flops = 2 * args.rows * k * n
            tflops = [flops / us[op] / 1e6 for op in ("forward", "dX", "dW")]
            moved = (args.rows * k + k * n + args.rows * n) * dtype.itemsize
            total[name_dtype] = total.get(name_dtype, 0.0) + us["forward"] + us["dX"] + us["dW"]
            print(
                f"| {name} ({k} -> {n}) | {name_dtype} | {us['forward']:.1f} | {us['dX']:.1f} "
                f"| {us['dW']:.1f} | {us['bias sum']:.1f} | "
                + " / ".join(f"{t:.0f}" for t in tflops)
                + f" | {moved / us['forward'] / 1e6:.2f} |"
            )
    for name_dtype, us in total.items():
        print(f"one layer's products, forward + both gradients, {name_dtype}: {us / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
