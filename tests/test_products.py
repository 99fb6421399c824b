"""The Triton matrix products (models/products_triton.py) against float64 F.linear: the
product and both gradients in float32 (tf32x3 forward and input gradient, cuBLAS weight
gradient); the dispatch `models.layers.product`.

On CUDA (marked gpu) and, where Triton is installed, on CPU through its interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error, run_in_triton_interpreter

# (rows, K, N): ragged blocks everywhere (K below tl.dot's 16, N below a block); in_proj,
# out_proj and the FFN's widths; rows over several weight-gradient partials.
SHAPES = [
    (5, 3, 7),
    (1100, 64, 324),
    (700, 128, 64),
    (613, 64, 256),
    (40, 256, 64),
    (4500, 64, 100),
]


def check_against_reference(device: str, shape: tuple, seed: int) -> dict:
    """Relative errors of y, dx, dweight against float64, inputs (2, rows/2, K) when rows
    is even (3-D, as the models pass them), else (rows, K)."""
    from models.products_triton import triton_product

    rows, k, n = shape
    gen = torch.Generator().manual_seed(seed)
    size = (2, rows // 2, k) if rows % 2 == 0 else (rows, k)
    x = torch.randn(size, generator=gen, dtype=torch.float64)
    weight = torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5
    grad = torch.randn(*size[:-1], n, generator=gen, dtype=torch.float64)
    fast = [t.to(device=device, dtype=torch.float32).requires_grad_() for t in (x, weight)]
    y = triton_product(*fast)
    assert y.shape == (*size[:-1], n) and y.dtype == torch.float32
    grads = torch.autograd.grad(y, fast, grad.to(device=device, dtype=torch.float32))
    ref = [t.clone().requires_grad_() for t in (x, weight)]
    y_ref = F.linear(*ref)
    grads_ref = torch.autograd.grad(y_ref, ref, grad)
    errors = {"y": relative_error(y, y_ref.detach())}
    for name, g, g_ref in zip(("dx", "dweight"), grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == torch.float32, name
        errors[name] = relative_error(g, g_ref)
    return errors


def test_the_dispatch_runs_functional_linear_off_cuda_and_refuses_unknown_kernels():
    from models.layers import product

    x, w = torch.randn(3, 5, 8), torch.randn(4, 8)
    for kernel in ("cublas", "triton"):  # on the CPU both are F.linear
        assert torch.equal(product(x, w, kernel), F.linear(x, w))
    with pytest.raises(ValueError, match="product_kernel must be one of"):
        product(x, w, "cutlass")


def test_wider_reductions_and_other_dtypes_are_refused():
    pytest.importorskip("triton")
    from models.products_triton import MAX_K, triton_product

    with pytest.raises(ValueError, match=f"at most {MAX_K} columns"):
        triton_product(torch.randn(4, MAX_K + 1), torch.randn(3, MAX_K + 1))
    with pytest.raises(ValueError, match="take float32"):
        triton_product(torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_products_match_float64_on_gpu(shape):
    errors = check_against_reference("cuda", shape, seed=sum(shape))
    print(f"\n[gpu] product {shape}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
def test_the_dispatch_keeps_wide_products_on_cublas_on_gpu():
    """Reductions over more than MAX_K columns (a model of width 128: W2 reduces over
    512) are F.linear's, bit for bit."""
    from models.layers import product
    from models.products_triton import MAX_K

    x, w = torch.randn(2, 50, MAX_K + 8, device="cuda"), torch.randn(64, MAX_K + 8, device="cuda")
    assert torch.equal(product(x, w, "triton"), F.linear(x, w))


@pytest.mark.gpu
def test_the_dispatch_keeps_bf16_autocast_on_cublas_on_gpu():
    """Under bf16 autocast `product` is F.linear's: the same values and gradients."""
    from models.layers import product

    x = torch.randn(2, 600, 64, device="cuda", requires_grad=True)
    w = (torch.randn(324, 64, device="cuda") / 8).requires_grad_()
    grad = torch.randn(2, 600, 324, device="cuda")
    outs = []
    for fn in (lambda x, w: product(x, w, "triton"), F.linear):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, w)
        outs.append([y, *torch.autograd.grad(y, [x, w], grad.to(y.dtype))])
    for name, got, want in zip(("y", "dx", "dweight"), *outs):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def check_sweep_configs(device: str) -> dict:
    """Each launch configuration of products_triton.SWEEP (both forward and both
    input-gradient variants) on a ragged in_proj-like product: the largest relative error
    of y and dx against float64, per configuration, and the largest |value| the forward
    leaves in its rows' padding (written as zeros)."""
    from models import products_triton as k

    rows, width, n = 300, 64, 100
    gen = torch.Generator().manual_seed(7)
    x, w, dy = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in
                ((rows, width), (n, width), (rows, n)))  # fmt: skip
    fast = {name: t.to(device=device, dtype=torch.float32) for name, t in zip("xwd", (x, w, dy))}
    errors = {}
    for config in k.sweep_configs("fwd", width, n):
        y = k.product_fwd(fast["x"], fast["w"], config)
        errors[f"fwd {config}"] = relative_error(y, x @ w.t())
        padded = torch.as_strided(y, (rows, y.stride(0)), (y.stride(0), 1))  # (rows, 112)
        errors[f"fwd {config} padding"] = padded[:, n:].abs().max().item()
    for config in k.sweep_configs("dx", width, n):
        dx = k.product_dx(fast["d"], fast["w"], config)
        errors[f"dx {config}"] = relative_error(dx, dy @ w)
    return errors


def test_products_in_interpreter():
    """The kernels' logic on CPU, where Triton is installed (it is not in CI's CPU setup)."""
    code = (
        "from tests.test_products import SHAPES, check_against_reference\n"
        "for i, shape in enumerate(SHAPES):\n"
        "    errors = check_against_reference('cpu', shape, seed=i)\n"
        "    assert max(errors.values()) < 1e-5, (shape, errors)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)


def test_sweep_configurations_in_interpreter():
    code = (
        "from tests.test_products import check_sweep_configs\n"
        "errors = check_sweep_configs('cpu')\n"
        "assert len(errors) >= 10 and max(errors.values()) < 1e-5, errors\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)


@pytest.mark.gpu
def test_sweep_configurations_on_gpu():
    errors = check_sweep_configs("cuda")
    assert max(errors.values()) < 1e-5, errors
