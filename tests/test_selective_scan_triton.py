"""The Triton selective scan against the step-by-step reference, outputs and gradients.

On CUDA (marked gpu) and, where Triton is installed, on CPU through its interpreter
(TRITON_INTERPRET=1, in a subprocess so the setting does not leak into other tests).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import relative_error, run_in_triton_interpreter

from models import selective_scan as ss

# (batch, channels D, state N, length L): one block; several channel blocks with a ragged
# last one; a state size that is not a power of two; Mamba4Rec's 64d shape.
SHAPES = [(2, 6, 4, 1), (3, 130, 16, 37), (2, 20, 5, 9), (4, 128, 32, 50)]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(gen: torch.Generator, batch: int, channels: int, state: int, length: int) -> dict:
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        # u and z as the mixer makes them: (B, D, L) views of (B, L, D) projections
        "u": randn(batch, length, channels).transpose(1, 2),
        "delta": randn(batch, length, channels).transpose(1, 2),
        "A": -5 * torch.rand(channels, state, generator=gen, dtype=torch.float64),
        "B": randn(batch, length, state).transpose(1, 2),
        "C": randn(batch, length, state).transpose(1, 2),
        "D": randn(channels),
        "z": randn(batch, length, channels).transpose(1, 2),
        "delta_bias": randn(channels),
    }


def check_against_reference(device: str, shape: tuple[int, int, int, int], seed: int) -> dict:
    """Max relative error of the Triton scan (float32) vs the float64 loop, per output."""
    gen = torch.Generator().manual_seed(seed)
    inputs = _inputs(gen, *shape)
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    fast = {k: v.float().to(device).requires_grad_() for k, v in inputs.items()}
    y_ref = ss.selective_scan_reference(**ref, delta_softplus=True)
    y = ss.selective_scan(**fast, delta_softplus=True, backend="triton")
    assert torch.isfinite(y).all()
    grad = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    grads_ref = torch.autograd.grad(y_ref, [ref[n] for n in NAMES], grad)
    grads = torch.autograd.grad(y, [fast[n] for n in NAMES], grad.float().to(device))
    errors = {"y": relative_error(y.cpu(), y_ref.detach())}
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        errors[f"d{name}"] = relative_error(g.cpu(), g_ref)
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_selective_scan_matches_reference_on_gpu(shape):
    errors = check_against_reference("cuda", shape, seed=sum(shape))
    print(
        f"\n[gpu] triton selective scan {shape}: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.gpu
def test_auto_backend_picks_triton_on_gpu():
    u = torch.randn(1, 4, 3, device="cuda")
    assert ss.scan_function("auto", u).__name__ == "TritonSelectiveScan"
    assert ss.scan_function("torch", u) is ss._SelectiveScan


def test_triton_backend_refuses_cpu_and_unknown_names():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs Triton on CPU")
    u = torch.randn(1, 4, 3)
    assert ss.scan_function("auto", u) is ss._SelectiveScan
    with pytest.raises(ValueError, match="Triton selective scan needs float32 CUDA"):
        ss.scan_function("triton", u)
    with pytest.raises(ValueError, match="backend must be one of"):
        ss.scan_function("cuda", u)


def test_triton_selective_scan_in_interpreter():
    """The kernels' logic on CPU, in Triton's interpreter (skipped where Triton is not installed)."""
    code = (
        "from tests.test_selective_scan_triton import SHAPES, check_against_reference\n"
        "for i, shape in enumerate(SHAPES[:3]):\n"
        "    errors = check_against_reference('cpu', shape, seed=i)\n"
        "    assert max(errors.values()) < 1e-4, (shape, errors)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)
