"""The fused Dropout(Hardswish(x + bias)) kernels against nn.functional in float64: output,
input and bias gradients, with and without dropout (the kernel's mask read off its
output) and bias.

On CUDA (marked gpu) and, where Triton is installed, on CPU through its interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error, run_in_triton_interpreter

from models.layers import dropout, hardswish_dropout

# (shape, dropout p, layout, bias): one ragged block; several programs; a transposed input
# (made contiguous by the op); dropout; one long row; bias with a ragged last program.
CASES = [
    ((3, 7, 5), 0.0, "contiguous", False),
    ((4, 50, 256), 0.0, "contiguous", True),
    ((6, 40), 0.0, "transposed", True),
    ((4, 50, 256), 0.3, "contiguous", False),
    ((9000,), 0.5, "contiguous", False),
    ((3, 301, 96), 0.2, "contiguous", True),
]


def check_against_reference(device: str, case: tuple, seed: int, dtype=torch.float32) -> dict:
    """Relative errors of the kernels (in `dtype`) against float64."""
    from models.hardswish_dropout_triton import HardswishDropout

    shape, p, layout, has_bias = case
    gen = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).double()
    bias = torch.randn(shape[-1], generator=gen, dtype=torch.float64) if has_bias else None
    if bias is None:
        x.view(-1)[:4] = torch.tensor([-3.0, 3.0, 0.0, -2.0])  # the gradient's break points
    grad = torch.randn(*shape, generator=gen, dtype=torch.float64)
    fast_x = x.to(device=device, dtype=dtype)
    if layout == "transposed":
        fast_x = fast_x.T.contiguous().T
    leaves = [fast_x] + ([] if bias is None else [bias.to(device=device, dtype=torch.float32)])
    leaves = [t.requires_grad_() for t in leaves]
    y = HardswishDropout.apply(leaves[0], p, leaves[1] if has_bias else None)
    assert y.shape == x.shape and y.dtype == dtype
    grads = torch.autograd.grad(y, leaves, grad.to(device=device, dtype=dtype))

    # dropped: zero output and zero gradient (at x + bias <= -3 both are zero, kept or not)
    pre = x if bias is None else x + bias
    flat = pre <= -3
    keep = (y.detach().cpu() != 0) | (grads[0].cpu() != 0) | flat
    if p > 0:
        rate = keep[~flat].double().mean().item()
        n = int((~flat).sum())
        assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, rate
    ref = [x.clone().requires_grad_()] + ([] if bias is None else [bias.clone().requires_grad_()])
    y_ref = F.hardswish(ref[0] if bias is None else ref[0] + ref[1]) * keep / (1 - p)
    grads_ref = torch.autograd.grad(y_ref, ref, grad)
    errors = {"y": relative_error(y, y_ref.detach())}
    for name, g, g_ref in zip(("dx", "dbias"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        errors[name] = relative_error(g, g_ref)
    return errors


def test_torch_backend_is_hardswish_then_dropout():
    """On the torch backend the op is the unfused composition, bit for bit (same RNG use)."""
    x, bias = torch.randn(5, 9, 32), torch.randn(32)
    torch.manual_seed(3)
    got = hardswish_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(got, dropout(F.hardswish(x), 0.2))
    assert torch.equal(hardswish_dropout(x, 0.0), F.hardswish(x))
    assert torch.equal(hardswish_dropout(x, 0.0, bias=bias), F.hardswish(x + bias))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_fused_hardswish_dropout_matches_reference_on_gpu(case):
    errors = check_against_reference("cuda", case, seed=len(case[0]) + int(10 * case[1]))
    print(
        f"\n[gpu] hardswish dropout {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.gpu
def test_fused_hardswish_dropout_in_bf16_rounds_only_its_results():
    for case in (CASES[3], CASES[5]):
        errors = check_against_reference("cuda", case, seed=1, dtype=torch.bfloat16)
        assert max(errors.values()) < 1e-2, (case, errors)


@pytest.mark.gpu
def test_fused_hardswish_dropout_masks_on_gpu():
    """Calls draw fresh masks, a seed repeats them, and CUDA graph replays draw fresh ones."""
    x = torch.randn(4096, device="cuda") + 5  # Hardswish(x) > 0: zeros are dropped elements
    torch.manual_seed(0)
    first, second = hardswish_dropout(x, 0.5, "triton"), hardswish_dropout(x, 0.5, "triton")
    torch.manual_seed(0)
    assert torch.equal(first, hardswish_dropout(x, 0.5, "triton"))
    assert not torch.equal(first, second)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = hardswish_dropout(x, 0.5, "triton")
    graph.replay()
    replayed = y.clone()
    graph.replay()
    assert not torch.equal(replayed, y)


def test_fused_hardswish_dropout_in_interpreter():
    """The kernels' logic on CPU, in Triton's interpreter (skipped where Triton is not installed)."""
    code = (
        "from tests.test_hardswish_dropout import CASES, check_against_reference\n"
        "for i, case in enumerate(CASES):\n"
        "    errors = check_against_reference('cpu', case, seed=i)\n"
        "    assert max(errors.values()) < 1e-6, (case, errors)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)
