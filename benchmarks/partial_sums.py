"""The second pass of the fused kernels' partial sums: PyTorch's `sum(-1)` against
models/triton_vectors.row_sums on the shapes an all-positions training step at the ML-1M
shape sums (per layer: the residual norms' weight and bias gradients, the FFN's b1, the
gated norm's weight and z bias, the SSD scan's D, A and dt_bias, the convolutions', the
time norm's), GPU us per call from CUDA graphs.

    python -m benchmarks.partial_sums
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from benchmarks.linear_products import time_us

# (rows ..., programs) as the profile of the all-positions step showed them (1,800 windows)
SHAPES = [(3, 64, 704), (256, 2813), (2, 128, 2813), (4, 3, 3150), (5, 4, 1800),
          (6, 192, 1800), (2, 200, 450)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from models.triton_vectors import row_sums

    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}; GPU us per call")
    print("| partials | torch sum(-1) | row_sums | max abs difference |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(*shape, device=device)
        torch_us = time_us(partial(torch.sum, x, -1), device)
        triton_us = time_us(partial(row_sums, x), device)
        diff = (row_sums(x) - x.sum(-1)).abs().max().item()
        print(f"| {shape} | {torch_us:.2f} | {triton_us:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
