"""The row-tiled gated RMSNorm kernels (models/gated_norm_triton.py) against the float64
reference: output and the gradients (z_bias's too, where the block passes in_proj's
bias), over shapes, layouts and dtypes; mamba-ssm's kernel on the same inputs as a
yardstick.

On CUDA (marked gpu) and, where Triton is installed, on CPU through its interpreter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_triton_kernels, relative_error, run_in_triton_interpreter

from ssd import rmsnorm_gated, rmsnorm_gated_reference

# (leading shape, N, layout): the block's rows of d_inner = 128 with z a column slice of the
# input projection (as the model passes it); a ragged last tile; N not a power of two; the
# 256-d model's rows; one row. Slices come with z_bias (in_proj's bias), as in the block.
CASES = [
    ((4, 50), 128, "slice"),
    ((3, 37), 128, "contiguous"),
    ((70,), 48, "slice"),
    ((2, 20), 512, "contiguous"),
    ((1,), 16, "contiguous"),
]


def relative_errors(case: tuple, device: str, kernel: str, dtype=torch.float32) -> dict:
    shape, N, layout = case
    g = torch.Generator().manual_seed(N + len(shape))
    f64 = dict(generator=g, dtype=torch.float64)
    x = (2 * torch.randn(*shape, N, **f64)).to(dtype).double()
    z = (2 * torch.randn(*shape, N, **f64)).to(dtype).double()
    weight = 1 + 0.3 * torch.randn(N, **f64)
    z_bias = torch.randn(N, **f64) if layout == "slice" else None
    grad = torch.randn(*shape, N, **f64)
    ref = [t.clone().requires_grad_() for t in (x, z, weight, z_bias) if t is not None]
    y_ref = rmsnorm_gated_reference(*ref[:3], 1e-5, *ref[3:])
    grads_ref = torch.autograd.grad(y_ref, ref, grad)

    fast_z = z.to(device=device, dtype=dtype)
    if layout == "slice":  # z as a column slice of a wider projection
        wide = torch.zeros(*shape, N + 70, device=device, dtype=dtype)
        wide[..., 5 : 5 + N] = fast_z
        fast_z = wide[..., 5 : 5 + N]
    fast = [x.to(device=device, dtype=dtype), fast_z]
    fast += [t.to(device=device, dtype=torch.float32) for t in (weight, z_bias) if t is not None]
    fast = [t.detach().requires_grad_() for t in fast]
    z_bias_arg = fast[3] if z_bias is not None else None
    if device == "cuda":
        y = rmsnorm_gated(*fast[:3], 1e-5, backend="triton", kernel=kernel, z_bias=z_bias_arg)
    else:  # Triton's interpreter runs the kernels on CPU tensors
        from models.gated_norm_triton import gated_rms_norm

        y = gated_rms_norm(*fast[:3], 1e-5, z_bias=z_bias_arg)
    assert y.shape == y_ref.shape and y.dtype == dtype
    grads = torch.autograd.grad(y, fast, grad.to(device=device, dtype=dtype))
    errors = {"y": relative_error(y, y_ref.detach())}
    names = ("dx", "dz", "dweight", "dz_bias")
    for name, got, want, leaf in zip(names, grads, grads_ref, fast):
        assert got.shape == want.shape and got.dtype == leaf.dtype, name
        errors[name] = relative_error(got, want)
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fused", "mamba"])
@pytest.mark.parametrize("case", CASES)
def test_gated_norm_kernels_match_float64_reference(case, kernel):
    needs_triton_kernels()
    errors = relative_errors(case, "cuda", kernel)
    print(
        f"\n[gpu] gated norm {kernel} {case}: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fused", "mamba"])
def test_gated_norm_kernels_with_bf16_inputs(kernel):
    needs_triton_kernels()
    errors = relative_errors(CASES[0], "cuda", kernel, dtype=torch.bfloat16)
    print(
        f"\n[gpu] gated norm {kernel} bf16: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    assert max(errors.values()) < 1e-2, errors


def test_unknown_kernel_is_refused():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="ssd_kernel must be one of"):
        rmsnorm_gated(x, x, torch.ones(8), 1e-5, kernel="cuda")


def test_gated_norm_in_interpreter():
    """The kernels' logic on CPU, in Triton's interpreter (skipped where Triton is not installed)."""
    code = (
        "from tests.test_gated_norm import CASES, relative_errors\n"
        "for case in CASES:\n"
        "    errors = relative_errors(case, 'cpu', 'fused')\n"
        "    assert max(errors.values()) < 1e-5, (case, errors)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)
