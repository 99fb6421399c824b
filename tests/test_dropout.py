"""models.layers.dropout: nn.functional.dropout's distribution with the CPU's mask drawn by
torch.rand (ATen's CPU bernoulli_ is ~4x slower)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.layers import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keeps_each_element_with_probability_one_minus_p_and_scales_it(p, dtype):
    x = (torch.rand(200_000, dtype=torch.float64) + 1).to(dtype)  # no zeros: zero = dropped
    y = dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    n = x.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # kept elements scaled by 1 / (1 - p) as `x * scale` scales them: rounded once in x's
    # dtype (no bf16-rounded scale)
    assert torch.equal(y[kept], x[kept] * (1.0 / (1.0 - p)))


def test_gradient_is_the_same_mask_and_scale():
    x = torch.randn(64, 50, 32, requires_grad=True)
    y = dropout(x, 0.3)
    grad = torch.randn_like(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    keep = y.detach() != 0
    torch.testing.assert_close(dx, grad * keep / 0.7)


def test_a_seed_repeats_the_masks_and_calls_draw_fresh_ones():
    x = torch.ones(10_000)
    torch.manual_seed(0)
    first, second = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(first, dropout(x, 0.5))
    assert not torch.equal(first, second)


def test_identity_in_evaluation_and_at_p0_zeros_at_p1():
    x = torch.randn(3, 4)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert isinstance(module, torch.nn.Dropout)  # code that looks for nn.Dropout finds it


def test_other_devices_call_nn_functional_dropout():
    x = torch.randn(8, 8, device="meta")
    y = dropout(x, 0.5)
    assert y.device.type == "meta" and y.shape == x.shape
    assert F.dropout(x, 0.5).shape == y.shape
