"""The fused causal convolution + Hardswish kernels against nn.functional, outputs and
gradients, on inputs laid out as TiSSDBlock passes them.

On CUDA (marked gpu) and, where Triton is installed, on CPU through its interpreter
(TRITON_INTERPRET=1, in a subprocess so the setting does not leak into other tests).
"""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error, run_in_triton_interpreter

from benchmarks.launch_options import launch_options
from ssd import causal_conv1d_hardswish_reference

# (batch, length, channels, kernel, layout): one segment; several segments and channel
# tiles with ragged ends; the time path's few channels; fewer rows than K - 1; a segment
# one row longer than the unrolled step, with a ragged channel tile; a 3-wide kernel, an
# odd channel count; a 2-wide kernel, rows fewer than the kernel. Slices (xBC, a slice of
# in_proj's output) come with in_proj's bias, x_bias, as in the block.
CASES = [
    (2, 7, 5, 4, "slice"),
    (3, 70, 130, 4, "slice"),
    (2, 50, 4, 4, "transposed"),
    (2, 3, 8, 4, "contiguous"),
    (2, 33, 96, 4, "slice"),
    (2, 9, 3, 3, "transposed"),
    (3, 1, 6, 2, "slice"),
]

# Launch geometries besides the shipped one: forward and backward unlike each other and
# the shipped ones (segments of 5 and 16 rows: ragged unrolled steps at every length).
OTHER_LAUNCH_OPTIONS = {
    "_causal_conv_fwd": dict(BLOCK_C=32, SEGMENT=5, UNROLL=2, num_warps=1),
    "_causal_conv_bwd": dict(BLOCK_C=128, SEGMENT=16, UNROLL=8, num_warps=2),
}


def _input(gen: torch.Generator, batch: int, length: int, channels: int, layout: str):
    """x (B, L, C) as the block makes it: a column slice of in_proj's output, a (B, C, L)
    tensor seen as (B, L, C) (the time signal), or contiguous. Scaled so pre-activations
    fall on all three pieces of Hardswish."""
    if layout == "slice":
        wide = 3 * torch.randn(batch, length, channels + 9, generator=gen, dtype=torch.float64)
        return wide[..., 5 : 5 + channels]
    if layout == "transposed":
        return 3 * torch.randn(
            batch, channels, length, generator=gen, dtype=torch.float64
        ).transpose(1, 2)
    return 3 * torch.randn(batch, length, channels, generator=gen, dtype=torch.float64)


def check_against_reference(device: str, case: tuple, seed: int, dtype=torch.float32) -> dict:
    """Relative errors of the Triton kernels (in `dtype`) against the float64 reference."""
    from models.causal_conv_triton import CausalConvHardswish

    batch, length, channels, kernel, layout = case
    gen = torch.Generator().manual_seed(seed)
    x = _input(gen, batch, length, channels, layout)
    weight = torch.randn(channels, 1, kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    params = [weight, bias]
    if layout == "slice":
        params.append(torch.randn(channels, generator=gen, dtype=torch.float64))  # x_bias
    x = x.to(dtype).double()  # the values the kernel sees
    ref = [t.clone().requires_grad_() for t in (x, *params)]
    y_ref = causal_conv1d_hardswish_reference(*ref)
    # the same layout on the device: the slice stays a slice, the transpose a transpose
    fast_x = x.to(device=device, dtype=dtype)
    if layout == "slice":
        wide = torch.zeros(batch, length, channels + 9, device=device, dtype=dtype)
        wide[..., 5 : 5 + channels] = fast_x
        fast_x = wide[..., 5 : 5 + channels]
    elif layout == "transposed":
        fast_x = fast_x.transpose(1, 2).contiguous().transpose(1, 2)
    fast = [fast_x.requires_grad_()] + [
        t.to(device=device, dtype=torch.float32).requires_grad_() for t in params
    ]
    y = CausalConvHardswish.apply(*fast)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert y.stride() == (fast_x.stride() if layout == "transposed" else y.contiguous().stride())
    grad = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    grads_ref = torch.autograd.grad(y_ref, ref, grad)
    grads = torch.autograd.grad(y, fast, grad.to(device=device, dtype=dtype))
    errors = {"y": relative_error(y, y_ref.detach())}
    for name, g, g_ref in zip(("dx", "dweight", "dbias", "dx_bias"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        errors[name] = relative_error(g, g_ref)
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("options", [None, OTHER_LAUNCH_OPTIONS], ids=["shipped", "other"])
@pytest.mark.parametrize("case", CASES)
def test_fused_causal_conv_matches_reference_on_gpu(case, options):
    from models import causal_conv_triton

    with launch_options(causal_conv_triton, options):
        errors = check_against_reference("cuda", case, seed=sum(case[:4]))
    print(f"\n[gpu] causal conv {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
def test_fused_causal_conv_in_bf16_rounds_only_its_output():
    errors = check_against_reference("cuda", CASES[1], seed=3, dtype=torch.bfloat16)
    assert max(errors.values()) < 1e-2, errors  # bf16 output and dx, float32 arithmetic


@pytest.mark.gpu
def test_wider_kernels_than_the_triton_path_takes_run_on_nn_functional_on_gpu():
    from models.causal_conv_triton import TAPS, CausalConvHardswish
    from ssd import causal_conv1d_hardswish

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=gen).cuda()
    weight, bias = torch.randn(6, 1, TAPS.value + 1).cuda(), torch.randn(6).cuda()
    with pytest.raises(ValueError, match="at most 4 taps"):
        CausalConvHardswish.apply(x, weight, bias)
    y = causal_conv1d_hardswish(x, weight, bias, backend="triton")
    assert torch.equal(y, causal_conv1d_hardswish_reference(x, weight, bias))


def test_fused_causal_conv_in_interpreter():
    """The kernels' logic on CPU, in Triton's interpreter (skipped where Triton is not installed)."""
    code = (
        "from benchmarks.launch_options import launch_options\n"
        "from models import causal_conv_triton\n"
        "from tests.test_causal_conv import CASES, OTHER_LAUNCH_OPTIONS, check_against_reference\n"
        "for options in (None, OTHER_LAUNCH_OPTIONS):\n"
        "    with launch_options(causal_conv_triton, options):\n"
        "        for i, case in enumerate(CASES):\n"
        "            errors = check_against_reference('cpu', case, seed=i)\n"
        "            assert max(errors.values()) < 1e-5, (options, case, errors)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)
