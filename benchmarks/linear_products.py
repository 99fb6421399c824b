"""cuBLAS on the TiM4Rec block's matrix products at the ML-1M all-positions step's shape:
GPU microseconds per product forward, input gradient, weight gradient and bias gradient
(PyTorch's sum), float32 and bfloat16, with the rate each reaches (TFLOP/s, and TB/s of
the bytes it must move: both operands read, the result written once).

These products run outside the fused kernels, so they bound how close to the floor the
step can get (docs/performance_notes.md, "Why the floor is out of reach").

    python -m benchmarks.linear_products                    # 120,000 rows, d = 64
    python -m benchmarks.linear_products --blas cublaslt
    python -m benchmarks.linear_products --kernel triton    # models/products_triton.py
    python -m benchmarks.linear_products --kernel triton --sweep   # launch configurations
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch

from benchmarks import measure
from benchmarks.floor import StepShape, product_shapes

CALLS = 20
REPLAYS = 5


def time_us(fn: Callable[[], object], device: torch.device) -> float:
    """Median GPU microseconds per call: CALLS calls captured in one CUDA graph, the graph
    replayed REPLAYS times. Replaying leaves out the host's launch cost, which back-to-back
    launches of these 50-200 us kernels do not always hide, so configurations compare on
    GPU time alone."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up: compile, autotune, allocate
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    per_replay = measure.time_calls(graph.replay, device, REPLAYS)
    return 1e6 * statistics.median(per_replay) / CALLS


def layer_products(hidden: int) -> list[tuple[str, int, int]]:
    """(name, k, n) of one layer's products Y (rows x n) = X (rows x k) W^T at width
    `hidden` (benchmarks/floor.py's product_shapes, the time path's and scoring left out)."""
    shape = StepShape(batch=1, seq_len=1, n_items=1, num_layers=1, hidden=hidden)
    names = ("in_proj", "out_proj", "ffn W1", "ffn W2")
    products = [p for p in product_shapes(shape) if p[0] in ("in_proj", "out_proj", "ffn")]
    return [(name, k, n) for name, (_, _, k, n) in zip(names, products)]


def measure_product(
    rows: int, k: int, n: int, dtype: torch.dtype, device, kernel: str = "cublas"
) -> dict[str, float]:
    """GPU us of one product's forward, dX, dW and bias sum; with kernel "triton" the
    float32 products are models/products_triton.py's (as the model runs them: bf16 stays
    on cuBLAS)."""
    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    dy = torch.randn(rows, n, device=device, dtype=dtype)
    calls = {"forward": lambda: x @ w.t(), "dX": lambda: dy @ w, "dW": lambda: dy.t() @ x}
    if kernel == "triton" and dtype == torch.float32:
        from models.products_triton import product_dw, product_dx, product_fwd

        calls.update(
            forward=lambda: product_fwd(x, w),
            dX=lambda: product_dx(dy, w),
            dW=lambda: product_dw(dy, x),
        )
    calls["bias sum"] = lambda: dy.sum(0, dtype=torch.float32)
    return {op: time_us(fn, device) for op, fn in calls.items()}


def sweep(rows: int, hidden: int, device) -> None:
    """Each float32 Triton product at each of products_triton.SWEEP's configurations: GPU
    us, the default configuration's and the fastest."""
    from models import products_triton as k

    ops = {"fwd": k.product_fwd, "dx": k.product_dx, "dw": k.product_dw}
    print("| product | op | default us | best us | best configuration |")
    print("|---|---|---|---|---|")
    for name, width, n in layer_products(hidden):
        x = torch.randn(rows, width, device=device)
        w = torch.randn(n, width, device=device)
        dy = torch.randn(rows, n, device=device)
        operands = {"fwd": (x, w), "dx": (dy, w), "dw": (dy, x)}
        for op, fn in ops.items():
            a, b = operands[op]
            default = time_us(partial(fn, a, b), device)
            results = []
            for config in k.sweep_configs(op, width, n):
                try:
                    us = time_us(partial(fn, a, b, config), device)
                except Exception as err:  # out of resources: that configuration loses
                    us = float("inf")
                    print(f"  {name} {op} {config}: {type(err).__name__}")
                results.append((us, config))
            best_us, best = min(results, key=lambda r: r[0])
            print(f"| {name} | {op} | {default:.1f} | {best_us:.1f} | {best} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120_000, help="positions per step")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blas", choices=("cublas", "cublaslt"), default="cublas")
    parser.add_argument("--kernel", choices=("cublas", "triton"), default="cublas")
    parser.add_argument("--sweep", action="store_true",
                        help="time the Triton kernels' launch configurations instead")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.preferred_blas_library(args.blas)
    if args.sweep:
        sweep(args.rows, args.hidden, device)
        return
    kernel = args.blas if args.kernel == "cublas" else "Triton products in float32"
    print(f"{torch.cuda.get_device_name()}, {kernel}, {args.rows:,} rows; GPU us per call")
    print("| product | dtype | forward | dX | dW | bias sum | TFLOP/s fwd / dX / dW | TB/s fwd |")
    print("|---|---|---|---|---|---|---|---|")
    total = {}
    for dtype in (torch.float32, torch.bfloat16):
        name_dtype = str(dtype).removeprefix("torch.")
        for name, k, n in layer_products(args.hidden):
            us = measure_product(args.rows, k, n, dtype, device, args.kernel)
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
