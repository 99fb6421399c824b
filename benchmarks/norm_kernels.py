"""The fused norms alone: the residual LayerNorm (models/layer_norm_triton.py), the SSD
block's gated RMSNorm (models/gated_norm_triton.py) and the time path's gate, mix and
prefix LayerNorm (models/time_mix_norm_triton.py, beside the PyTorch ops it replaces), at
the ML-1M all-positions step's shape (600 x 200 rows), forward and forward + backward,
float32 and bfloat16 inputs, GPU busy time and each kernel's time.

The LayerNorm as TiM4Rec's layers call it: x a product's output (bf16 under autocast)
with that product's bias, a float32 residual, dropout 0.2. The gated norm: x the scan's
output, z a column slice of in_proj's output with its bias. `--sweep` times the launch
options (the LayerNorm's elements per row block, shared by both kernels since they number
the dropout draws, and warps; the gated norm's rows per program and warps), both kernels
of a norm at each, to choose `LAUNCH_OPTIONS`.

    python -m benchmarks.norm_kernels
    python -m benchmarks.norm_kernels --sweep --out norm_kernels.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks.launch_options import launch_options
from benchmarks.ssd_kernels import time_calls
from models import gated_norm_triton, layer_norm_triton, time_mix_norm_triton
from models.layers import PrefixLayerNorm, time_mix_norm


def _calls(apply: Callable, inputs: list, leaves: list, grad) -> tuple[Callable, Callable]:
    """(forward call, forward + backward call): gradients with torch.autograd.grad, so no
    leaf accumulates a .grad between calls."""

    def forward():
        return apply(*inputs)

    def forward_backward():
        torch.autograd.grad(forward(), leaves, grad)

    return forward, forward_backward


def layer_norm_calls(rows: int, dtype: torch.dtype, device="cuda") -> tuple[Callable, Callable]:
    """(forward call, forward + backward call) of the residual LayerNorm."""
    d = 64
    x = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(rows, d, device=device, requires_grad=True)
    weight, bias, x_bias = (torch.randn(d, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(rows, d, device=device)
    inputs = [x, residual, weight, bias, 1e-12, 0.2, x_bias]
    leaves = [x, residual, weight, bias, x_bias]
    return _calls(layer_norm_triton.DropoutAddLayerNorm.apply, inputs, leaves, grad)


def gated_norm_calls(rows: int, dtype: torch.dtype, device="cuda") -> tuple[Callable, Callable]:
    """(forward call, forward + backward call) of the gated RMSNorm; z a column slice of
    in_proj's (rows, 324) output, a leaf of its own."""
    d_inner = 128
    x = torch.randn(rows, d_inner, device=device, dtype=dtype, requires_grad=True)
    z = torch.randn(rows, 324, device=device, dtype=dtype)[:, :d_inner].requires_grad_()
    weight, z_bias = (torch.randn(d_inner, device=device, requires_grad=True) for _ in range(2))
    grad = torch.randn(rows, d_inner, device=device, dtype=dtype)
    inputs = [x, z, weight, 1e-12, z_bias, None]
    leaves = [x, z, weight, z_bias]
    return _calls(gated_norm_triton.GatedRMSNorm.apply, inputs, leaves, grad)


def time_mix_norm_calls(
    rows: int, dtype: torch.dtype, device="cuda", fused: bool = True
) -> tuple[Callable, Callable]:
    """(forward call, forward + backward call) of the causal time path's end, as a layer
    of the all-positions step calls it: T and theta (B, H, L) float32 (theta a transposed
    view of the time convolution's (B, L, H) output), the gate logits in `dtype` (a
    product's output under autocast), prefix statistics."""
    H, L = 4, 200
    B = rows // L
    T = torch.randn(B, H, L, device=device, requires_grad=True)
    theta = torch.randn(B, L, H, device=device).transpose(1, 2).requires_grad_()
    logits = torch.randn(B, H, L, device=device, dtype=dtype, requires_grad=True)
    norm = PrefixLayerNorm(L).to(device)
    grad = torch.randn(B, H, L, device=device)
    leaves = [logits, T, theta, norm.weight, norm.bias]
    if fused:
        inputs = [*leaves, norm.eps, True]
        return _calls(time_mix_norm_triton.TimeMixNorm.apply, inputs, leaves, grad)
    return _calls(time_mix_norm, [logits, T, theta, norm, "torch"], leaves, grad)


NORMS = {
    "layer norm": (layer_norm_triton, layer_norm_calls),
    "gated norm": (gated_norm_triton, gated_norm_calls),
    "time mix norm": (time_mix_norm_triton, time_mix_norm_calls),
    # the PyTorch ops the fused time mix norm replaces, for comparison
    "time mix norm, PyTorch": (None, partial(time_mix_norm_calls, fused=False)),
}


def sweep_options() -> list[tuple[str, dict]]:
    """(norm, options) to time besides the shipped ones."""
    variants = []
    ln = tuple(layer_norm_triton.LAUNCH_OPTIONS)
    # 4096 elements per block and 64 rows per program were slower at every warp count
    # (call E, docs/results/norm-launch-h200/), the latter by 2-10x
    for quarter, warps in itertools.product((512, 1024, 2048), (1, 2, 4, 8)):
        options = {name: dict(num_warps=warps) for name in ln}
        variants.append(("layer norm", dict(QUARTER_ELEMENTS=quarter, **options)))
    gn = tuple(gated_norm_triton.LAUNCH_OPTIONS)
    for rows, warps in itertools.product((8, 16, 32), (1, 2, 4, 8)):
        variants.append(("gated norm", {name: dict(ROWS=rows, num_warps=warps) for name in gn}))
    tm = tuple(time_mix_norm_triton.LAUNCH_OPTIONS)
    for rows, warps in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
        variants.append(("time mix norm", {name: dict(ROWS=rows, num_warps=warps) for name in tm}))
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600 * 200, help="rows (windows x L)")
    parser.add_argument("--sweep", action="store_true", help="time the launch options")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    variants = [(norm, {}) for norm in NORMS] + (sweep_options() if args.sweep else [])
    print(f"{torch.cuda.get_device_name(device)}, {args.rows} rows; GPU busy ms, kernels us")
    print("| norm | dtype | options | forward ms | forward + backward ms | kernels us |")
    print("|---|---|---|---|---|---|", flush=True)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for norm, options in variants:
            module, calls = NORMS[norm]
            head = f"| {norm} | {str(dtype)[6:]} | {options or 'shipped'} |"
            try:
                with launch_options(module, options) if module else contextlib.nullcontext():
                    timing = time_calls(*calls(args.rows, dtype), device)
            except Exception as err:  # one failing option keeps the others
                print(f"{head} {type(err).__name__}: {str(err)[:200]} | | |", flush=True)
                continue
            kernels = timing.pop("kernels")
            if module is None:  # PyTorch's ops: how many kernels, not each
                us = {"all": 1e3 * sum(kernels.values())}
                listed = f"{len(kernels)} distinct kernels"
            else:
                us = {name: 1e3 * kernels.get(name, float("nan")) for name in module.LAUNCH_OPTIONS}
                listed = ", ".join(f"{name.strip('_')} {v:.1f}" for name, v in us.items())
            print(f"{head} {timing['fwd_ms']:.3f} | {timing['fwd_bwd_ms']:.3f} | {listed} |",
                  flush=True)  # fmt: skip
            results.append(dict(norm=norm, dtype=str(dtype)[6:], options=options, us=us, **timing))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
