"""FP fusion (FMA contraction) on and off in the project's sm_90 PTX, on a CPU.

Triton 3.9 warns that `enable_fp_fusion` will default to False from Triton 3.10; every
kernel here was tuned and tested with it on. This compiles the hot kernels both ways
(Triton's own ptxas; no GPU) and prints fused multiply-adds, instructions and registers.
Run from the repository root: `python docs/results/session22/fp_fusion_ptx.py`.
"""

import re
import subprocess
import sys
import tempfile

sys.path.insert(0, ".")
sys.path.insert(0, "tests")

import triton  # noqa: E402

from benchmarks.sm90 import F32, compile_for_sm90, ssd_kernel_args  # noqa: E402
from test_triton_compile import compile_product  # noqa: E402

import benchmarks.sm90 as sm90  # noqa: E402

PINNED = sm90.COMPILE_OPTIONS


LAST = {}
_compile = triton.compile


def _capture(*args, **kwargs):  # keep the compiled kernel: its cubin is what ptxas made
    LAST["kernel"] = _compile(*args, **kwargs)
    return LAST["kernel"]


triton.compile = _capture


def sass_counts() -> tuple[int, int, int]:
    """(FFMA, FMUL + FADD, all instructions) in the last compiled kernel's SASS."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = get_ptxas(90).path.replace("ptxas", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(LAST["kernel"].asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    ffma = sum(o.startswith("FFMA") for o in ops)
    mul_add = sum(o.startswith(("FMUL", "FADD")) for o in ops)
    return ffma, mul_add, len(ops)


def fusion_option(fusion: bool | None) -> dict:
    """The option as given; None: left out, and compile_for_sm90's pinned value dropped."""
    sm90.COMPILE_OPTIONS = {} if fusion is None else dict(PINNED)
    return {} if fusion is None else {"enable_fp_fusion": fusion}


def main() -> None:
    from models import products_triton as p
    from models import ssd_triton as s

    cases = []
    for op, K, N in [("fwd", 64, 324), ("dx", 64, 324), ("dx", 256, 64), ("fwd", 64, 256)]:
        config = p.launch_config(op, K, N)
        if config["variant"] != "cublas":
            cases.append((f"product {op} {K}->{N} {config['variant']}",
                          lambda fusion, op=op, K=K, N=N, c=config: compile_product(
                              op, K, N, {**c, **fusion_option(fusion)})))
    for name, args in ssd_kernel_args(200, 32, 32, 32, H=4, dtype=F32).items():
        kernel = getattr(s, name)
        cases.append((f"ssd {name} fp32",
                      lambda fusion, kernel=kernel, args=args, name=name: compile_for_sm90(
                          kernel, options={**s.LAUNCH_OPTIONS[name], **fusion_option(fusion)},
                          **args)))
    from benchmarks.sm90 import conv_kernel_args, conv_launch
    from models import causal_conv_triton as c

    for name, args in conv_kernel_args(200, 320, 324, F32).items():
        kernel, options = getattr(c, name), conv_launch(name, 200, 320)[1]
        cases.append((f"conv {name} fp32",
                      lambda fusion, kernel=kernel, args=args, options=options: compile_for_sm90(
                          kernel, options={**options, **fusion_option(fusion)}, **args)))
    print(f"triton {triton.__version__}")
    print("| kernel | SASS FFMA on / off | FMUL+FADD on / off | instructions on / off "
          "| pinned = Triton's default |")
    print("|---|---|---|---|---|")
    for label, build in cases:
        row, cubins = [], []
        for fusion in (True, False, None):  # None: the option left out, Triton's default
            build(fusion)
            row.append(sass_counts())
            cubins.append(LAST["kernel"].asm["cubin"])
        (f1, m1, n1), (f0, m0, n0), _ = row
        same = "yes" if cubins[0] == cubins[2] else "no"
        print(f"| {label} | {f1} / {f0} | {m1} / {m0} | {n1} / {n0} | {same} |")


if __name__ == "__main__":
    main()
