"""The Triton matrix products (models/products_triton.py) against float64 F.linear: the
product and both gradients in float32 (tf32x3 forward and input gradient, bf16x6 weight
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


# (rows, K, N) of the weight gradient: ragged tiles and splits, each layer's widths, and
# the step's 120,000 rows (over the float32 error of long sums).
DW_SHAPES = [(5, 3, 7), (1100, 64, 324), (700, 128, 64), (613, 64, 256), (4500, 256, 64)]
DW_SHAPES += [(120_000, 64, 324)]


def check_weight_gradient(device: str, shape: tuple) -> None:
    """product_dw at its launch configuration and each of the sweep's against float64: as
    accurate as float32 cuBLAS on the GPU (within 2x; float32 on CPU), and bit for bit the
    same on a second call (fixed-order partial sums); dY a column slice of wider rows, as
    in_proj's shared gradient is."""
    from models import products_triton as k

    rows, width, n = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    dy = torch.randn(rows, n + 12, generator=gen, dtype=torch.float64)[:, :n]
    want = dy.t() @ x
    x32, dy32 = x.to(device, torch.float32), dy.to(device, torch.float32)
    plain = relative_error(dy32.t() @ x32, want)
    for config in [k.launch_config("dw", width, n), *k.sweep_configs("dw", width, n)]:
        got = k.product_dw(dy32, x32, config)
        assert got.shape == (n, width) and got.dtype == torch.float32
        error = relative_error(got, want)
        assert error < max(2 * plain, 1e-6), (config, error, plain)
        assert torch.equal(got, k.product_dw(dy32, x32, config)), config


def test_weight_gradient_in_interpreter():
    code = (
        "from tests.test_products import DW_SHAPES, check_weight_gradient\n"
        "for shape in DW_SHAPES[:4]:\n"
        "    check_weight_gradient('cpu', shape)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", DW_SHAPES)
def test_weight_gradient_matches_float64_on_gpu(shape):
    check_weight_gradient("cuda", shape)


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
    """Each launch configuration of products_triton.SWEEP (the forward's, the input
    gradient's and the weight gradient's variants) on a ragged in_proj-like product: the
    relative error of y, dx or dw against float64, per configuration, and the largest
    |value| the forward leaves in its rows' padding (written as zeros)."""
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
    for config in k.sweep_configs("dw", width, n):
        dw = k.product_dw(fast["d"], fast["x"], config)
        errors[f"dw {config}"] = relative_error(dw, dy.t() @ x)
    return errors


# Relative error bounds of the sweep's configurations: the bf16x6 ones (dw's "bf16x6",
# dx's "w6") carry float32's 24 bits (measured 1e-7 to 1.6e-7, as torch's float32 matmul);
# tf32x3 drops more of the low-order products.
SWEEP_BOUND, BF16X6_BOUND = 1e-5, 1e-6


def sweep_errors_over_bound(errors: dict) -> dict:
    def bound(name: str) -> float:
        return BF16X6_BOUND if "'bf16x6'" in name or "'w6'" in name else SWEEP_BOUND

    return {name: e for name, e in errors.items() if not e < bound(name)}


def test_products_in_interpreter():
    """The kernels' logic on CPU, in Triton's interpreter (skipped where Triton is not installed)."""
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
        "from tests.test_products import check_sweep_configs, sweep_errors_over_bound\n"
        "errors = check_sweep_configs('cpu')\n"
        "assert len(errors) >= 10 and not sweep_errors_over_bound(errors), errors\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)


@pytest.mark.gpu
def test_sweep_configurations_on_gpu():
    errors = check_sweep_configs("cuda")
    assert not sweep_errors_over_bound(errors), errors
