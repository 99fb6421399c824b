"""Registers and spills of the SSD scan's, the causal convolution's and the time path's
Triton kernels on an H100/H200 (sm_90), computed on any machine with Triton, no GPU: each
kernel compiled at the ML-1M step's shape with its launch options, then Triton's
`ptxas -v` on the PTX.

Spilled registers go to local memory; a kernel at 255 registers with spills is a
candidate for smaller tiles or fewer live values, but the GPU decides: fewer registers can
also mean fewer loads in flight (docs/performance_notes.md, the one-kernel convolution
backward). This narrows what `python -m benchmarks.ssd_kernels --sweep` should time.

    python -m benchmarks.kernel_registers            # the launch options the model uses
    python -m benchmarks.kernel_registers --sweep    # 2 / 4 / 8 warps x 1 / 2 stages
"""

from __future__ import annotations

import argparse
import itertools

from benchmarks.sm90 import (
    BF16,
    F32,
    compile_for_sm90,
    conv_kernel_args,
    conv_launch,
    ptxas_resources,
    ssd_kernel_args,
    time_mix_norm_kernel_args,
)


def kernel_rows(sweep: bool, seq_len: int = 200) -> list[dict]:
    """One row per (kernel, dtype, launch options)."""
    from models import causal_conv_triton, ssd_triton, time_mix_norm_triton

    rows = []
    for dtype, dtype_name in ((F32, "float32"), (BF16, "bfloat16")):
        kernels = [
            (ssd_triton, name, args, ssd_triton.LAUNCH_OPTIONS[name])
            for name, args in ssd_kernel_args(seq_len, 32, 32, 32, 4, dtype).items()
        ]
        kernels += [  # xBC: 192 of in_proj's 324 columns
            (causal_conv_triton, name, args, conv_launch(name, seq_len, 192)[1])
            for name, args in conv_kernel_args(seq_len, 192, 324, dtype).items()
        ]
        kernels += [  # the causal time path's: prefix statistics, a gate per position
            (time_mix_norm_triton, name, args, options)
            for name, (args, options) in time_mix_norm_kernel_args(seq_len, 4, dtype).items()
        ]
        for module, name, args, chosen in kernels:
            options = [chosen]
            if sweep:
                options += [
                    dict(num_warps=w, num_stages=s)
                    for w, s in itertools.product((2, 4, 8), (1, 2))
                    if dict(num_warps=w, num_stages=s) != chosen
                ]
            for opts in options:
                ptx = compile_for_sm90(getattr(module, name), options=opts, **args)
                rows.append(
                    dict(kernel=name, dtype=dtype_name, options=opts, used=opts is chosen,
                         **ptxas_resources(ptx))
                )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also 2/4/8 warps x 1/2 stages")
    parser.add_argument("--seq-len", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"sm_90, ML-1M shape (L = {args.seq_len}, H = 4, P = N = Q = 32, xBC 192 channels)")
    print("| kernel | dtype | warps | stages | used by the model | registers | spill stores B |")
    print("|---|---|---|---|---|---|---|")
    for r in kernel_rows(args.sweep, args.seq_len):
        o = r["options"]
        print(f"| {r['kernel']} | {r['dtype']} | {o['num_warps']} | {o.get('num_stages', 'default')} | "
              f"{'yes' if r['used'] else ''} | {r['registers']} | {r['spill_stores']} |")  # fmt: skip


if __name__ == "__main__":
    main()
