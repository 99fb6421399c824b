"""Bias-gradient reductions at the ML-1M all-positions step's shapes: PyTorch's sum over
rows against the Triton column sum (models/linear_triton.py), GPU time per call.

    python -m benchmarks.column_sum            # 128,200 rows of 324, 256 and 64 columns
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks import measure


def time_us(fn, calls: int = 50) -> float:
    """Median GPU microseconds per call of `fn` (measure.time_calls), after a warm-up."""
    for _ in range(5):  # compile, warm up
        fn()
    return 1e6 * statistics.median(measure.time_calls(fn, torch.device("cuda"), calls))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128_200)
    parser.add_argument("--columns", default="324,256,64")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from models.linear_triton import column_sum

    print(f"{torch.cuda.get_device_name()}, GPU us per call")
    print("| rows x cols | dtype | torch sum(0) us | Triton column sum us | GB/s torch / Triton |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for cols in (int(c) for c in args.columns.split(",")):
            x = torch.randn(args.rows, cols, device="cuda").to(dtype)
            reference = time_us(lambda x=x: x.sum(0, dtype=torch.float32))
            triton_us = time_us(lambda x=x: column_sum(x))
            gb = x.numel() * x.element_size() / 1e3
            print(f"| {args.rows:,} x {cols} | {str(dtype)[6:]} | {reference:.1f} | "
                  f"{triton_us:.1f} | {gb / reference:.0f} / {gb / triton_us:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
