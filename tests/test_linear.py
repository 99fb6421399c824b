"""nn.Linear with a Triton column sum for its bias gradient (models/linear_triton.py)
against nn.functional.linear: outputs and the three gradients, float32 and under bf16
autocast. On CUDA (marked gpu) and, where Triton is installed, on CPU through its
interpreter."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_triton_interpreter
from torch import nn

from models.layers import Linear, linear

# (rows, in, out): one partial row block; several with a ragged end and a ragged column
# block; TiM4Rec's in_proj, out_proj and FFN widths
SHAPES = [(5, 3, 7), (1100, 64, 324), (700, 128, 64), (613, 64, 256), (40, 256, 64)]


def check_against_functional(device: str, rows: int, d_in: int, d_out: int, seed: int) -> dict:
    """Relative errors of LinearColumnSumBias against F.linear, float32, input (2, rows/2,
    d_in) when rows is even (a 3-D input as the models pass), else (rows, d_in)."""
    from models.linear_triton import LinearColumnSumBias

    gen = torch.Generator().manual_seed(seed)
    shape = (2, rows // 2, d_in) if rows % 2 == 0 else (rows, d_in)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    bias = torch.randn(d_out, generator=gen)
    grad = torch.randn(*shape[:-1], d_out, generator=gen)
    errors = {}
    outs = {}
    for name, fn in (("fast", LinearColumnSumBias.apply), ("reference", F.linear)):
        leaves = [t.to(device).requires_grad_() for t in (x, weight, bias)]
        y = fn(*leaves)
        outs[name] = [y, *torch.autograd.grad(y, leaves, grad.to(device))]
    for label, got, want in zip(("y", "dx", "dweight", "dbias"), outs["fast"], outs["reference"]):
        assert got.shape == want.shape and got.dtype == want.dtype, label
        errors[label] = ((got - want).norm() / want.norm()).item()
    return errors


def test_the_module_is_an_nn_linear_with_its_state_dict():
    layer = Linear(4, 6, backend="auto")
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # CPU: F.linear


def test_the_torch_backend_and_bias_free_layers_call_functional_linear():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    torch.testing.assert_close(linear(x, w, None, "auto"), F.linear(x, w))
    torch.testing.assert_close(linear(x, w, torch.ones(5), "torch"), F.linear(x, w) + 1)


def test_only_wide_layers_with_a_bias_take_the_column_sum(monkeypatch):
    """The dispatch, without Triton: a stand-in for models.linear_triton records calls."""
    import types

    import models.layers as layers

    calls = []
    fake = types.SimpleNamespace(
        LinearColumnSumBias=types.SimpleNamespace(
            apply=lambda x, w, b: calls.append(w.shape[0]) or F.linear(x, w, b)
        )
    )
    monkeypatch.setitem(sys.modules, "models.linear_triton", fake)
    monkeypatch.setattr(layers, "_runs_triton", lambda backend, device: True)
    x = torch.randn(3, 4)
    wide = layers.COLUMN_SUM_MIN_FEATURES
    for rows, bias in ((wide, True), (wide - 1, True), (wide, False)):
        w = torch.randn(rows, 4)
        b = torch.randn(rows) if bias else None
        torch.testing.assert_close(linear(x, w, b, "triton"), F.linear(x, w, b))
    assert calls == [wide]


def test_column_sum_and_linear_in_interpreter():
    """The kernel's logic on CPU, where Triton is installed (it is not in CI's CPU setup)."""
    code = (
        "import torch\n"
        "from models.linear_triton import column_sum\n"
        "from tests.test_linear import SHAPES, check_against_functional\n"
        "for i, shape in enumerate(SHAPES):\n"
        "    errors = check_against_functional('cpu', *shape, seed=i)\n"
        "    assert max(errors.values()) < 1e-5, (shape, errors)\n"
        "x = torch.randn(1030, 130).bfloat16()\n"
        "got, want = column_sum(x), x.float().sum(0)\n"
        "assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-3), (got - want).abs().max()\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_functional_on_gpu(shape):
    errors = check_against_functional("cuda", *shape, seed=sum(shape))
    print(f"\n[gpu] linear {shape}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    # cuBLAS products on both sides; the bias sums in another order
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
def test_linear_under_bf16_autocast_matches_functional_on_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 600, 64, device="cuda", generator=gen)
    layer = Linear(64, 324, backend="triton").cuda()
    grad = torch.randn(2, 600, 324, device="cuda", generator=gen).bfloat16()
    results = []
    for fn in (layer, lambda t: F.linear(t, layer.weight, layer.bias)):
        leaves = [x.clone().requires_grad_(), layer.weight, layer.bias]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(leaves[0])
        results.append([y, *torch.autograd.grad(y, leaves, grad)])
    for label, got, want in zip(("y", "dx", "dweight", "dbias"), *results):
        assert got.dtype == want.dtype, label  # bf16 output, float32 gradients of fp32 leaves
        error = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert error < 1e-2, (label, error)


@pytest.mark.gpu
def test_the_bias_gradient_is_deterministic_on_gpu():
    from models.linear_triton import column_sum

    x = torch.randn(120_000, 324, device="cuda")
    assert torch.equal(column_sum(x), column_sum(x))
    torch.testing.assert_close(column_sum(x), x.sum(0), rtol=1e-5, atol=1e-3)
