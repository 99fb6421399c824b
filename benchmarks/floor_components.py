"""How close the kernels the step cannot do without come, alone, to the step's floor.

benchmarks/floor.py's floor assumes every FLOP at the matrix units' peak and each layer
fused into one forward and one backward kernel. This script measures, on the GPU, the
parts of a TiM4Rec training step that no fusion of the rest can remove, each alone at the
step's shape, forward and backward, as the GPU's busy time (torch.profiler, so the host's
launch time does not count):

- the SSD scan, once per layer: mamba-ssm's `mamba_chunk_scan_combined` (the kernel
  TiM4Rec is specified to call) and this project's fused kernel (models/ssd_triton.py);
  the sum takes the faster;
- the gated RMSNorm, once per layer: mamba-ssm's `rmsnorm_fn` and this project's
  (models/gated_norm_triton.py); the sum takes the faster;
- the matrix products floor.py counts (in_proj, out_proj, the FFN, the time path's L x L
  maps and gate, scoring against all items) on cuBLAS through `F.linear`.

If their sum already exceeds 3x the floor, the issue's "within 3x of the floor" needs
faster kernels than these at these sizes, not scheduling or fusion of what is left.

    python -m benchmarks.floor_components            # ML-1M all-positions step, H200/H100
    python -m benchmarks.floor_components --windows 2048 --targets 2048   # default mode
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import floor as floor_model
from benchmarks import measure
from models.backend import import_mamba_triton
from pipeline.precision import PRECISIONS

WARMUP_CALLS = 3
TIMED_CALLS = 10


def _leaf(*shape: int, device: torch.device, dtype=torch.float32, scale: float = 1.0):
    return (scale * torch.randn(*shape, device=device, dtype=dtype)).requires_grad_()


def _forward_backward(outputs: Callable[[], list[torch.Tensor]]) -> Callable[[], None]:
    """A call running `outputs` and the backward pass of all of them (unit gradients)."""

    def step() -> None:
        tensors = outputs()
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])

    return step


def ssd_scans(s: floor_model.StepShape, device, dtype, kernel: str = "mamba") -> Callable[[], None]:
    """The SSD scan forward + backward, once per layer: mamba-ssm's (x, B, C apart) or the
    fused kernel (x, B, C packed in one tensor, as the model passes them)."""
    W, L, H, P, N = s.batch, s.seq_len, s.nheads, s.head_dim, s.d_state
    layers = []
    for _ in range(s.num_layers):
        inputs = dict(
            dt=_leaf(W, L, H, device=device, dtype=dtype),  # (B, L, H)
            A=(-torch.rand(H, device=device) - 0.5).requires_grad_(),  # (H,)
            D=_leaf(H, device=device),
            dt_bias=_leaf(H, device=device),
        )
        if kernel == "fused":
            inputs.update(xBC=_leaf(W, L, H * P + 2 * N, device=device, dtype=dtype))
        else:
            inputs.update(
                x=_leaf(W, L, H, P, device=device, dtype=dtype),  # (B, L, H, P)
                B=_leaf(W, L, 1, N, device=device, dtype=dtype),  # (B, L, G, N)
                C=_leaf(W, L, 1, N, device=device, dtype=dtype),
            )
        layers.append(inputs)
    if kernel == "fused":
        from models.ssd_triton import fused_ssd_packed

        def scan(**inputs):
            return fused_ssd_packed(nheads=H, d_state=N, **inputs)
    else:
        scan, _ = import_mamba_triton()
    return _forward_backward(
        lambda: [scan(chunk_size=s.chunk_size, dt_softplus=True, **inputs) for inputs in layers]
    )


def gated_norms(
    s: floor_model.StepShape, device, dtype, kernel: str = "mamba"
) -> Callable[[], None]:
    """The gated RMSNorm over (B * L, d_inner), forward + backward, once per layer:
    mamba-ssm's or the row-tiled one."""
    _, rmsnorm_fn = import_mamba_triton()
    if kernel == "fused":
        from models.gated_norm_triton import gated_rms_norm

        def rmsnorm_fn(x, w, _, z, eps, norm_before_gate):
            return gated_rms_norm(x, z, w, eps)

    T, D = s.batch * s.seq_len, s.d_inner
    layers = [
        (
            _leaf(T, D, device=device, dtype=dtype),
            _leaf(T, D, device=device, dtype=dtype),
            _leaf(D, device=device),
        )
        for _ in range(s.num_layers)
    ]
    return _forward_backward(
        lambda: [
            rmsnorm_fn(x, w, None, z=z, eps=1e-5, norm_before_gate=False) for x, z, w in layers
        ]
    )


def matrix_products(s: floor_model.StepShape, device, dtype) -> Callable[[], None]:
    """The products floor.py counts, as F.linear (cuBLAS), forward + backward."""
    operands = [
        (_leaf(m, k, device=device, dtype=dtype), _leaf(n, k, device=device, scale=k**-0.5))
        for _, m, k, n in floor_model.product_shapes(s)
    ]
    return _forward_backward(lambda: [F.linear(x, w.to(dtype)) for x, w in operands])


COMPONENTS = {
    "SSD scan (mamba-ssm)": ssd_scans,
    "SSD scan (fused, this project)": partial(ssd_scans, kernel="fused"),
    "gated RMSNorm (mamba-ssm)": gated_norms,
    "gated RMSNorm (fused, this project)": partial(gated_norms, kernel="fused"),
    "matrix products (cuBLAS)": matrix_products,
}


def measure_components(s: floor_model.StepShape, precision: str, device) -> dict[str, float]:
    """GPU busy ms per step of each component, in `precision` (bf16: bfloat16 activations
    and products, float32 parameters of the SSD, as under autocast)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    result = {}
    for name, build in COMPONENTS.items():
        step = build(s, device, dtype)
        for _ in range(WARMUP_CALLS):  # compile, autotune, cuBLAS heuristics
            step()
        result[name], _, _ = measure.gpu_busy(step, device, TIMED_CALLS)
        del step
        torch.cuda.empty_cache()
    return result


ALTERNATIVES = ("SSD scan", "gated RMSNorm")  # components measured in two implementations


def components_sum(parts: dict[str, float]) -> float:
    """The step's unavoidable kernel time: the faster of each alternative, and the rest."""
    total = sum(ms for name, ms in parts.items() if not name.startswith(ALTERNATIVES))
    for prefix in ALTERNATIVES:
        total += min(ms for name, ms in parts.items() if name.startswith(prefix))
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=600, help="sequences per step (B)")
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--items", type=int, default=3707, help="item table rows (ML-1M)")
    parser.add_argument("--targets", type=int, default=2048, help="positions scored per step")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or import_mamba_triton() is None:
        raise SystemExit("needs a CUDA GPU and mamba-ssm's Triton kernels")
    device = torch.device("cuda")
    shape = floor_model.StepShape(
        batch=args.windows,
        seq_len=args.seq_len,
        n_items=args.items,
        targets=args.targets,
        p2p_residual=True,  # the causal time path of all-positions training
    )
    peaks = floor_model.device_peaks(torch.cuda.get_device_name(device))
    table = {}
    for precision in args.precisions.split(","):
        if precision not in PRECISIONS:
            raise SystemExit(f"--precisions: one of {PRECISIONS}, got {precision!r}")
        floor = floor_model.floor(shape, precision, peaks)
        parts = measure_components(shape, precision, device)
        table[precision] = {
            "components_ms": parts,
            "sum_ms": components_sum(parts),
            "floor_ms": floor.get("floor_ms"),
        }
    print(f"{torch.cuda.get_device_name(device)}, step of {args.windows} x {args.seq_len}, "
          f"{args.targets} targets, {args.items} items; GPU busy ms per step, fwd + bwd")  # fmt: skip
    print("| component | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for name in COMPONENTS:
        print(f"| {name} | " + " | ".join(f"{t['components_ms'][name]:.2f}" for t in table.values()) + " |")  # fmt: skip
    rows = [
        ("sum (the faster of each)", "sum_ms", 1),
        ("floor", "floor_ms", 1),
        ("3 x floor", "floor_ms", 3),
    ]
    for label, key, factor in rows:
        cells = [f"{factor * t[key]:.2f}" if t[key] else "-" for t in table.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{t['sum_ms'] / t['floor_ms']:.1f}" if t["floor_ms"] else "-" for t in table.values()]
    print("| sum / floor | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"shape": vars(args) | {"out": None}, "table": table}, indent=2)
        )


if __name__ == "__main__":
    main()
