"""The SSD block's fused kernels alone: the scan (mamba-ssm's kernels against
models/ssd_triton.py) and the causal convolution of xBC (nn.functional against
models/causal_conv_triton.py).

GPU busy time (torch.profiler) of one layer's call at the ML-1M all-positions step's
shape, forward and forward + backward, float32 and bfloat16 inputs; for the fused kernels
also each scan kernel's registers and spills. `--sweep` times the fused scan kernels'
launch options (warps, pipeline stages) and the convolution's (channels per program,
rows per segment and per unrolled step, warps) to choose their defaults, with each convolution kernel's time. "time conv" is the
time path's convolution: 4 channels of a (B, H, L) signal seen as (B, L, H).

    python -m benchmarks.ssd_kernels                     # 600 x 200, H = 4, P = N = Q = 32
    python -m benchmarks.ssd_kernels --sweep --out ssd_kernels.json
    python -m benchmarks.ssd_kernels --sweep --ops "conv,time conv"
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.launch_options import launch_options
from models import causal_conv_triton, ssd_triton
from models.backend import import_mamba_triton
from ssd import causal_conv1d_hardswish, unpack_xbc

CONV_KERNELS = tuple(causal_conv_triton.LAUNCH_OPTIONS)

TIMED_CALLS = 20


def make_inputs(batch, seqlen, nheads, headdim, dstate, dtype) -> dict[str, torch.Tensor]:
    """Inputs as TiM4Rec's block passes them: x, B, C packed in one conv output."""
    dev = "cuda"
    leaves = dict(
        xBC=torch.randn(batch, seqlen, nheads * headdim + 2 * dstate, device=dev, dtype=dtype),
        dt=0.5 * torch.randn(batch, seqlen, nheads, device=dev, dtype=dtype),
        A=-torch.rand(nheads, device=dev) * 15 - 1,
        D=torch.randn(nheads, device=dev),
        dt_bias=torch.randn(nheads, device=dev) - 4,
    )
    for t in leaves.values():
        t.requires_grad_()
    return leaves


def scan_calls(
    kernel: str, inputs: dict, d_state: int, chunk_size: int
) -> tuple[Callable, Callable]:
    """(forward call, forward + backward call) of one scan: the fused kernel reads the
    packed tensor, mamba-ssm's the column slices x, B, C of it (as the model calls each)."""
    leaves = list(inputs.values())
    nheads = inputs["dt"].size(-1)
    scalars = dict(
        chunk_size=chunk_size, dt_softplus=True, D=inputs["D"], dt_bias=inputs["dt_bias"]
    )

    def forward():
        if kernel == "fused":
            return ssd_triton.fused_ssd_packed(
                inputs["xBC"], inputs["dt"], inputs["A"], nheads, d_state, **scalars
            )
        scan, _ = import_mamba_triton()
        x, B, C = unpack_xbc(inputs["xBC"], nheads, d_state)
        return scan(x, inputs["dt"], inputs["A"], B.unsqueeze(2), C.unsqueeze(2), **scalars)

    grad = torch.randn_like(forward())

    def forward_backward():
        torch.autograd.grad(forward(), leaves, grad)

    return forward, forward_backward


def conv_calls(kernel: str, inputs: dict) -> tuple[Callable, Callable]:
    """(forward call, forward + backward call) of the causal convolution + Hardswish of
    xBC, a column slice of in_proj's output (as the model calls it)."""
    backend = "triton" if kernel == "fused" else "torch"
    leaves = list(inputs.values())

    def forward():
        # nn.functional's conv takes one dtype (under autocast, as the model runs it)
        with torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=inputs["x"].dtype != torch.float32
        ):
            return causal_conv1d_hardswish(inputs["x"], inputs["weight"], inputs["bias"], backend)

    grad = torch.randn_like(forward())

    def forward_backward():
        torch.autograd.grad(forward(), leaves, grad)

    return forward, forward_backward


def _conv_leaves(x: torch.Tensor, channels: int) -> dict[str, torch.Tensor]:
    """x and a random weight (channels, 1, 4) and bias, as leaves requiring gradients."""
    weight = 0.5 * torch.randn(channels, 1, 4, device="cuda")
    bias = torch.randn(channels, device="cuda")
    return {k: t.detach().requires_grad_() for k, t in dict(x=x, weight=weight, bias=bias).items()}


def time_conv_inputs(batch, seqlen, nheads, dtype) -> dict[str, torch.Tensor]:
    x = torch.randn(batch, nheads, seqlen, device="cuda").to(dtype).transpose(1, 2)
    return _conv_leaves(x, nheads)


def conv_inputs(batch, seqlen, nheads, headdim, dstate, dtype) -> dict[str, torch.Tensor]:
    d_inner, channels = nheads * headdim, nheads * headdim + 2 * dstate
    # in_proj's output [z | xBC | dt]; the convolution reads the xBC columns
    projection = torch.randn(batch, seqlen, d_inner + channels + nheads, device="cuda")
    x = projection.to(dtype)[..., d_inner : d_inner + channels]
    return _conv_leaves(x, channels)


def kernel_resources() -> dict[str, dict]:
    """Registers, spills and shared memory of the fused kernels compiled so far, where this
    Triton version exposes them (JITFunction.device_caches)."""
    found = {}
    for name in ssd_triton.LAUNCH_OPTIONS:
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


def time_calls(forward: Callable, forward_backward: Callable, device) -> dict:
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
    parser.add_argument("--ops", default="scan,conv,time conv",
                        help="comma list of what to time: scan, conv, time conv")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or import_mamba_triton() is None:
        raise SystemExit("needs a CUDA GPU and mamba-ssm's Triton kernels")
    device = torch.device("cuda")
    shape = (args.windows, args.seq_len, args.heads, args.head_dim, args.d_state)
    # (op, kernel, {fused scan kernel: its launch options}): the defaults, then with --sweep
    # each fused scan kernel's options varied one kernel at a time
    variants: list[tuple[str, str, dict]] = [
        ("scan", "mamba", {}), ("scan", "fused", {}), ("conv", "torch", {}), ("conv", "fused", {}),
        ("time conv", "torch", {}), ("time conv", "fused", {}),
    ]  # fmt: skip
    if args.sweep:
        variants += [
            ("scan", "fused", {name: dict(num_warps=w, num_stages=s)})
            for name in ssd_triton.LAUNCH_OPTIONS
            for w, s in itertools.product((2, 4, 8), (1, 2))
        ]
        # both convolution kernels at one geometry (channels per program, rows per
        # segment, rows per unrolled step, warps); the profile times each kernel, so each
        # can take its best. The time path has 4 channels: 4 per program whatever BLOCK_C.
        conv_grid = {
            "conv": [
                (c, s, u, w)
                for c, s, u, w in itertools.product((32, 64, 128), (32, 64), (4, 8), (1, 2))
                if c >= 32 * w
            ],
            "time conv": itertools.product((64,), (16, 32, 64, 256), (4, 8), (1,)),
        }
        variants += [
            (op, "fused", {name: dict(BLOCK_C=c, SEGMENT=s, UNROLL=u, num_warps=w)
                           for name in causal_conv_triton.LAUNCH_OPTIONS})
            for op, grid in conv_grid.items()
            for c, s, u, w in grid
        ]  # fmt: skip
    ops = {op.strip() for op in args.ops.split(",")}
    variants = [v for v in variants if v[0] in ops]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        scan_in, conv_in = make_inputs(*shape, dtype), conv_inputs(*shape, dtype)
        time_in = time_conv_inputs(args.windows, args.seq_len, args.heads, dtype)
        for op, kernel, options in variants:
            module = causal_conv_triton if "conv" in op else ssd_triton
            try:
                with launch_options(module, options):
                    if op == "scan":
                        calls = scan_calls(kernel, scan_in, args.d_state, args.chunk_size)
                    else:
                        calls = conv_calls(kernel, conv_in if op == "conv" else time_in)
                    timing = time_calls(*calls, device)
            except Exception as err:  # one failing option keeps the others
                timing = dict(error=f"{type(err).__name__}: {str(err)[:200]}")
            rows.append(dict(op=op, kernel=kernel, dtype=str(dtype)[6:], options=options, **timing))
    print(f"{torch.cuda.get_device_name(device)}, one layer, (B, L, H, P, N) = {shape}, "
          f"Q = {args.chunk_size}; GPU busy ms")  # fmt: skip
    print("| op | kernel | dtype | options | forward | backward | forward + backward |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['op']} | {r['kernel']} | {r['dtype']} | {r['options'] or 'default'} |"
        if "error" in r:
            print(f"{head} {r['error']} | | |")
            continue
        print(f"{head} {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |")
    print("\nThe fused convolution's kernels, GPU us per call:")
    print("| op | dtype | options | " + " | ".join(CONV_KERNELS) + " |")
    print("|---|---|---|" + "---|" * len(CONV_KERNELS))
    for r in rows:
        if r["op"] in ("conv", "time conv") and r["kernel"] == "fused" and "kernels" in r:
            options = next(iter(r["options"].values()), "default")
            us = [f"{1e3 * r['kernels'].get(name, float('nan')):.1f}" for name in CONV_KERNELS]
            print(f"| {r['op']} | {r['dtype']} | {options} | " + " | ".join(us) + " |")
    resources = kernel_resources()
    print("fused kernels compiled:", json.dumps(resources))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"shape": shape, "rows": rows, "resources": resources}, indent=1)
        )


if __name__ == "__main__":
    main()
