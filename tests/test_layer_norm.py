"""The fused LayerNorm(Dropout(x + x_bias) + residual) kernels against nn.functional in
float64: output and the five gradients, with and without residual, x_bias and dropout.

The kernels draw their own dropout masks (Philox), so with dropout the reference uses the
kernel's mask, read off the input gradient (zero exactly where an element was dropped),
and the tests check the mask's rate, that calls draw fresh masks, that a seed repeats
them and that CUDA graph replays draw fresh ones.

On CUDA (marked gpu) and, where Triton is installed, on CPU through its interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error, run_in_triton_interpreter

from models.layers import DropoutAddLayerNorm, dropout, dropout_add_layer_norm

# (leading shape, N, residual, layout, dropout p, x_bias): ragged last tile; N not a power
# of two; no residual (the embedding norm); a strided column slice; dropout with and
# without residual; one row; x_bias (the preceding product's) with and without dropout.
CASES = [
    ((3, 50), 64, True, "contiguous", 0.0, False),
    ((2, 37), 48, True, "contiguous", 0.0, True),
    ((130,), 64, False, "contiguous", 0.0, False),
    ((4, 33), 32, True, "slice", 0.0, False),
    ((5, 40), 64, True, "contiguous", 0.3, True),
    ((300,), 64, False, "slice", 0.5, True),
    ((1,), 16, True, "contiguous", 0.0, False),
]


def check_against_reference(device: str, case: tuple, seed: int, dtype=torch.float32) -> dict:
    """Relative errors of the kernels (x in `dtype`, the rest float32) against float64."""
    from models.layer_norm_triton import DropoutAddLayerNorm as Fused

    shape, N, has_residual, layout, p, has_x_bias = case
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, N + 7, generator=gen, dtype=torch.float64) + 1)[..., 3 : 3 + N]
    x = x.to(dtype).double()  # the values the kernel sees
    residual = torch.randn(*shape, N, generator=gen, dtype=torch.float64) if has_residual else None
    weight = 1 + 0.5 * torch.randn(N, generator=gen, dtype=torch.float64)
    bias = torch.randn(N, generator=gen, dtype=torch.float64)
    x_bias = torch.randn(N, generator=gen, dtype=torch.float64) if has_x_bias else None
    grad = torch.randn(*shape, N, generator=gen, dtype=torch.float64)

    fast_x = x.to(device=device, dtype=dtype)
    if layout == "slice":  # the kernel reads rows through their stride
        wide = torch.zeros(*shape, N + 7, device=device, dtype=dtype)
        wide[..., 3 : 3 + N] = fast_x
        fast_x = wide[..., 3 : 3 + N]
    inputs = [fast_x, residual, weight, bias, x_bias]
    fast = [None if t is None else t.to(device) for t in inputs]
    fast[1:] = [None if t is None else t.float() for t in fast[1:]]
    fast = [None if t is None else t.requires_grad_() for t in fast]
    y = Fused.apply(fast[0], fast[1], fast[2], fast[3], 1e-5, p, fast[4])
    assert y.shape == (*shape, N) and y.dtype == torch.float32
    grads = torch.autograd.grad(y, [t for t in fast if t is not None], grad.to(device))

    keep = grads[0].detach().cpu() != 0  # dropped elements get no gradient
    if p > 0:
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 1e-3, rate
    ref = [
        None if t is None else t.clone().requires_grad_()
        for t in (x, residual, weight, bias, x_bias)
    ]
    h = ref[0] if x_bias is None else ref[0] + ref[4]
    h = h * keep / (1 - p) if p > 0 else h
    if has_residual:
        h = h + ref[1]
    y_ref = F.layer_norm(h, (N,), ref[2], ref[3], 1e-5)
    grads_ref = torch.autograd.grad(y_ref, [t for t in ref if t is not None], grad)
    names = ["dx"] + ["dresidual"] * has_residual + ["dweight", "dbias"] + ["dx_bias"] * has_x_bias
    errors = {"y": relative_error(y, y_ref.detach())}
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.shape == g_ref.shape, name
        errors[name] = relative_error(g, g_ref)
    return errors


@pytest.mark.gpu
def test_fused_layer_norm_masks_on_gpu():
    """Calls draw fresh masks; the generator's seed repeats them; eval (p = 0) drops nothing."""
    norm = DropoutAddLayerNorm(64, dropout=0.5, backend="triton").cuda()
    x = torch.randn(256, 64, device="cuda")
    torch.manual_seed(0)
    first, second = norm(x), norm(x)
    torch.manual_seed(0)
    again = norm(x)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)
    norm.eval()
    want = F.layer_norm(x, (64,), norm.weight, norm.bias, norm.eps)
    assert torch.allclose(norm(x), want, rtol=1e-5, atol=1e-5)


def test_dropout_kernels_refuse_tensors_past_their_int32_draw_index():
    from models.triton_dropout import MAX_ELEMENTS, check_elements

    check_elements(MAX_ELEMENTS, "op")
    with pytest.raises(ValueError, match=f"op: {MAX_ELEMENTS + 1} elements"):
        check_elements(MAX_ELEMENTS + 1, "op")


def test_torch_backend_is_dropout_add_then_layer_norm():
    """On the torch backend the op is the unfused composition, bit for bit (same RNG use)."""
    norm = DropoutAddLayerNorm(16, dropout=0.3, eps=1e-12)
    x, residual = torch.randn(4, 7, 16), torch.randn(4, 7, 16)
    torch.manual_seed(5)
    got = norm(x, residual)
    torch.manual_seed(5)
    want = F.layer_norm(dropout(x, 0.3) + residual, (16,), norm.weight, norm.bias, 1e-12)
    assert torch.equal(got, want)
    norm.eval()
    assert torch.equal(norm(x), F.layer_norm(x, (16,), norm.weight, norm.bias, 1e-12))
    assert torch.equal(
        dropout_add_layer_norm(x, None, norm.weight, norm.bias, 1e-12, 0.0),
        F.layer_norm(x, (16,), norm.weight, norm.bias, 1e-12),
    )
    x_bias = torch.randn(16)
    assert torch.equal(
        norm(x, residual, x_bias=x_bias),
        F.layer_norm(x + x_bias + residual, (16,), norm.weight, norm.bias, 1e-12),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_fused_layer_norm_matches_reference_on_gpu(case):
    errors = check_against_reference("cuda", case, seed=sum(case[0]) + case[1])
    print(f"\n[gpu] layer norm {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
def test_fused_layer_norm_with_bf16_input_under_autocast():
    """bf16 x (a product's output under autocast), float32 residual: float32 arithmetic
    and output, the input gradient rounded to bf16."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for case in (CASES[0], CASES[4]):
            errors = check_against_reference("cuda", case, seed=1, dtype=torch.bfloat16)
            assert errors["y"] < 1e-5 and errors["dx"] < 1e-2, (case, errors)


@pytest.mark.gpu
def test_fused_layer_norm_draws_fresh_masks_in_cuda_graph_replays():
    norm = DropoutAddLayerNorm(64, dropout=0.5, backend="triton").cuda()
    x = torch.randn(512, 64, device="cuda")
    norm(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = norm(x)
    graph.replay()
    first = y.clone()
    graph.replay()
    assert not torch.equal(first, y)


def test_fused_layer_norm_in_interpreter():
    """The kernels' logic on CPU, in Triton's interpreter (skipped where Triton is not installed)."""
    code = (
        "from tests.test_layer_norm import CASES, check_against_reference\n"
        "for i, case in enumerate(CASES):\n"
        "    errors = check_against_reference('cpu', case, seed=i)\n"
        "    assert max(errors.values()) < 1e-5, (case, errors)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)
