"""The SSD scan alone: mamba-ssm's kernels against the fused one (models/ssd_triton.py).

GPU busy time (torch.profiler) of one layer's scan at the ML-1M all-positions step's shape,
forward and forward + backward, float32 and bfloat16 inputs; for the fused kernel also
each kernel's registers and spills. `--sweep` times the fused kernel's launch options
(warps, pipeline stages) to choose its defaults.

    python -m benchmarks.ssd_kernels                     # 600 x 200, H = 4, P = N = Q = 32
    python -m benchmarks.ssd_kernels --sweep --out ssd_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import measure
from models import ssd_triton
from models.backend import import_mamba_triton

TIMED_CALLS = 20


def make_inputs(batch, seqlen, nheads, headdim, dstate, dtype) -> dict[str, torch.Tensor]:
    """Inputs as TiM4Rec's block passes them: x, B, C column slices of one conv output."""
    dev = "cuda"
    packed = torch.randn(batch, seqlen, nheads * headdim + 2 * dstate, device=dev, dtype=dtype)
    x, B, C = torch.split(packed, [nheads * headdim, dstate, dstate], dim=-1)
    leaves = dict(
        x=x.view(batch, seqlen, nheads, headdim),
        dt=0.5 * torch.randn(batch, seqlen, nheads, device=dev, dtype=dtype),
        A=-torch.rand(nheads, device=dev) * 15 - 1,
        B=B.view(batch, seqlen, 1, dstate),
        C=C.view(batch, seqlen, 1, dstate),
        D=torch.randn(nheads, device=dev),
        dt_bias=torch.randn(nheads, device=dev) - 4,
    )
    for t in leaves.values():
        t.requires_grad_()
    return leaves


def scan_calls(kernel: str, inputs: dict, chunk_size: int) -> tuple[Callable, Callable]:
    """(forward call, forward + backward call) of one scan."""
    if kernel == "mamba":
        scan, _ = import_mamba_triton()
    else:
        scan = ssd_triton.fused_ssd
    grad = torch.randn_like(inputs["x"])

    def forward():
        return scan(**inputs, chunk_size=chunk_size, dt_softplus=True)

    def forward_backward():
        torch.autograd.grad(forward(), list(inputs.values()), grad)

    return forward, forward_backward


def kernel_resources() -> dict[str, dict]:
    """Registers, spills and shared memory of the fused kernels compiled so far, where this
    Triton version exposes them (JITFunction.device_caches)."""
    found = {}
    for name in ("_ssd_fwd", "_ssd_bwd"):
        try:
            caches = getattr(ssd_triton, name).device_caches
            for cache in caches.values():
                for compiled in cache[0].values():
                    found.setdefault(name, []).append(
                        dict(
                            regs=compiled.n_regs,
                            spills=compiled.n_spills,
                            shared=compiled.metadata.shared,
                            warps=compiled.metadata.num_warps,
                            stages=compiled.metadata.num_stages,
                        )
                    )
        except Exception as err:  # introspection only
            found[name] = [{"error": f"{type(err).__name__}: {err}"}]
    return found


def time_scan(kernel: str, inputs: dict, chunk_size: int, device) -> dict[str, float]:
    forward, forward_backward = scan_calls(kernel, inputs, chunk_size)
    for _ in range(3):  # compile, autotune
        forward_backward()
    fwd_ms, _, _ = measure.gpu_busy(forward, device, TIMED_CALLS)
    total_ms, _, events = measure.gpu_busy(forward_backward, device, TIMED_CALLS)
    kernels = {
        e.key: e.self_device_time_total / 1e3 / TIMED_CALLS
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    }
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=total_ms, bwd_ms=total_ms - fwd_ms, kernels=kernels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=600, help="sequences (B)")
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--d-state", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--sweep", action="store_true", help="time the fused kernel's options")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or import_mamba_triton() is None:
        raise SystemExit("needs a CUDA GPU and mamba-ssm's Triton kernels")
    device = torch.device("cuda")
    shape = (args.windows, args.seq_len, args.heads, args.head_dim, args.d_state)
    variants: list[tuple[str, dict | None]] = [("mamba", None), ("fused", None)]
    if args.sweep:
        variants += [
            ("fused", dict(num_warps=w, num_stages=s))
            for w, s in itertools.product((2, 4, 8), (1, 2, 3))
        ]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(*shape, dtype)
        for kernel, options in variants:
            ssd_triton.FWD_OPTIONS = ssd_triton.BWD_OPTIONS = options
            try:
                timing = time_scan(kernel, inputs, args.chunk_size, device)
            except Exception as err:  # one failing option keeps the others
                timing = dict(error=f"{type(err).__name__}: {str(err)[:200]}")
            rows.append(dict(kernel=kernel, dtype=str(dtype)[6:], options=options, **timing))
        ssd_triton.FWD_OPTIONS = ssd_triton.BWD_OPTIONS = None
    print(f"{torch.cuda.get_device_name(device)}, one layer's scan, (B, L, H, P, N) = {shape}, "
          f"Q = {args.chunk_size}; GPU busy ms")  # fmt: skip
    print("| kernel | dtype | options | forward | backward | forward + backward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kernel']} | {r['dtype']} | {r['options']} | {r['error']} | | |")
            continue
        print(f"| {r['kernel']} | {r['dtype']} | {r['options'] or 'default'} | "
              f"{r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |")  # fmt: skip
    resources = kernel_resources()
    print("fused kernels compiled:", json.dumps(resources))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"shape": shape, "rows": rows, "resources": resources}, indent=1)
        )


if __name__ == "__main__":
    main()
