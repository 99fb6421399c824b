"""models/split_gradient.py: the split's gradient equals torch.split's (the concatenation of
the blocks' gradients) whoever computes them, and blocks written in place are not copied.

On CPU with a stand-in consumer; with the gated norm's and the convolution's Triton
kernels in Triton's interpreter (where installed) and on CUDA (marked gpu).
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_triton_kernels, relative_error, run_in_triton_interpreter

import ssd
from models.split_gradient import SharedGradient, gradient_buffer, split_columns

WIDTHS = [5, 7, 2]


class DoubleInto(torch.autograd.Function):
    """y = 2 x, writing x's gradient into `into()` as the fused kernels do."""

    @staticmethod
    def forward(ctx, x, into):
        ctx.into = into
        return 2 * x

    @staticmethod
    def backward(ctx, dy):
        dx = gradient_buffer(ctx.into, dy)
        torch.mul(dy, 2, out=dx)
        return dx, None


def gradient_of_split_input(t: torch.Tensor, loss_of_blocks) -> torch.Tensor:
    """The gradient that reaches t (a non-leaf, through a hook) when loss_of_blocks(t)."""
    seen = []
    t.register_hook(seen.append)
    loss_of_blocks(t).backward()
    return seen[0]


def test_split_columns_equals_torch_split_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    leaf = torch.randn(3, 4, sum(WIDTHS), generator=gen, requires_grad=True)
    weights = [torch.randn(3, 4, w, generator=gen) for w in WIDTHS]

    def loss(blocks):
        return sum((b.square() * w).sum() for b, w in zip(blocks, weights))

    t = leaf * 1.5
    blocks, _ = split_columns(t, WIDTHS)
    for got, want in zip(blocks, torch.split(t, WIDTHS, dim=-1)):
        assert torch.equal(got, want)
    got = gradient_of_split_input(t, lambda t: loss(split_columns(t, WIDTHS)[0]))
    want = gradient_of_split_input(leaf * 1.5, lambda t: loss(torch.split(t, WIDTHS, dim=-1)))
    assert torch.equal(got, want)


def test_blocks_written_in_place_are_not_copied_and_unused_blocks_are_zero():
    gen = torch.Generator().manual_seed(1)
    leaf = torch.randn(2, 6, sum(WIDTHS), generator=gen, dtype=torch.float64, requires_grad=True)
    written = []

    def loss(t):
        (a, b, _), gradient = split_columns(t, WIDTHS)  # the last block unused

        def into():
            written.append(gradient.block(0))
            return written[-1]

        return DoubleInto.apply(a, into).sum() + b.square().sum()

    t = leaf * 1.0
    grad = gradient_of_split_input(t, loss)
    assert written and written[0].data_ptr() == grad.data_ptr()  # block 0 written in place
    a, b, c = torch.split(grad, WIDTHS, dim=-1)
    assert torch.equal(a, torch.full_like(a, 2.0))
    assert torch.equal(b, 2 * t[..., 5:12].detach())
    assert torch.equal(c, torch.zeros_like(c))


def test_a_buffer_of_another_dtype_or_size_is_not_used():
    like = torch.zeros(4, 3)
    gradient = SharedGradient(torch.zeros(4, 5, dtype=torch.float64), [3, 2])
    assert gradient_buffer(lambda: gradient.block(0), like).dtype == torch.float32
    gradient32 = SharedGradient(torch.zeros(4, 5), [2, 3])
    assert gradient_buffer(lambda: gradient32.block(0), like).shape == like.shape
    assert gradient_buffer(None, like).shape == like.shape


def test_the_gradient_rows_are_padded_to_16_columns():
    """in_proj's 324 columns: rows of 336, so Triton's kernels see a stride divisible by 16."""
    gradient = SharedGradient(torch.zeros(2, 3, 324), [100, 200, 24])
    full = gradient.full()
    assert full.shape == (2, 3, 324) and full.stride() == (3 * 336, 336, 1)
    assert gradient.block(2).shape == (2, 3, 24) and gradient.block(2).stride(-2) == 336


def test_widths_must_cover_the_last_axis():
    with pytest.raises(ValueError, match="do not add up"):
        SharedGradient(torch.zeros(2, 5), [2, 2])


def test_a_second_backward_does_not_overwrite_the_first_gradient():
    """With the graph retained, a second backward writes a new gradient tensor: the one the
    first pass handed out (here straight to the caller) keeps its values."""
    leaf = torch.randn(2, 3, sum(WIDTHS), requires_grad=True)
    (a, b, c), gradient = split_columns(leaf, WIDTHS)
    loss = DoubleInto.apply(a, lambda: gradient.block(0)).sum() + (b * c[..., :1]).sum()
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    kept = first.clone()
    loss = DoubleInto.apply(a, lambda: gradient.block(0)).sum() * 3 + (b * c[..., :1]).sum()
    (second,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(first, kept)
    assert not torch.equal(second, first)  # the second loss has another gradient


def fused_block_gradients(device: str, seed: int = 0, dtype=torch.float32) -> dict:
    """[z | xBC | dt] split with split_columns, z into the fused gated norm and xBC into
    the fused convolution (both writing in place), dt into a product: the gradient of the
    split tensor against float64 torch.split + the reference ops, and whether the two
    fused blocks were written in place."""
    from models.causal_conv_triton import CausalConvHardswish
    from models.gated_norm_triton import gated_rms_norm
    from ssd import causal_conv1d_hardswish_reference, rmsnorm_gated_reference

    widths = [16, 24, 4]
    gen = torch.Generator().manual_seed(seed)
    t64 = torch.randn(2, 9, sum(widths), generator=gen, dtype=torch.float64)
    x64 = torch.randn(2, 9, widths[0], generator=gen, dtype=torch.float64)
    norm_w = torch.randn(widths[0], generator=gen, dtype=torch.float64)
    conv_w = torch.randn(widths[1], 1, 4, generator=gen, dtype=torch.float64)
    conv_b = torch.randn(widths[1], generator=gen, dtype=torch.float64)
    dt_w = torch.randn(2, 9, widths[2], generator=gen, dtype=torch.float64)

    def loss(t, split, norm, conv, cast):
        z, xbc, dt = split(t)
        y = norm(cast(x64), z, cast(norm_w)) * cast(x64)
        return (
            y.sum() + conv(xbc, cast(conv_w), cast(conv_b)).square().sum() + (dt * cast(dt_w)).sum()
        )

    written = {}

    def split(t):
        blocks, gradient = split_columns(t, widths)
        written["gradient"] = gradient
        return blocks

    def into(index):
        def block():
            written[index] = gradient.block(index)
            return written[index]

        gradient = written["gradient"]
        return block

    t = (t64.to(device=device, dtype=dtype)).requires_grad_()
    got = gradient_of_split_input(
        t * 1.0,
        lambda t: loss(
            t,
            split,
            lambda x, z, w: gated_rms_norm(x, z, w, 1e-5, dz_into=into(0)),
            lambda x, w, b: CausalConvHardswish.apply(x, w, b, None, into(1)),
            lambda v: v.to(device=device, dtype=torch.float32),
        ),
    )
    want = gradient_of_split_input(
        t64.clone().requires_grad_() * 1.0,
        lambda t: loss(
            t,
            lambda t: torch.split(t, widths, dim=-1),
            lambda x, z, w: rmsnorm_gated_reference(x, z, w, 1e-5),
            causal_conv1d_hardswish_reference,
            lambda v: v,
        ),
    )
    in_place = all(
        written[i].data_ptr() in range(got.data_ptr(), got.data_ptr() + got.nbytes) for i in (0, 1)
    )
    return dict(error=relative_error(got, want), in_place=in_place)


@pytest.mark.gpu
def test_fused_kernels_write_the_split_gradient_in_place_on_gpu():
    result = fused_block_gradients("cuda")
    assert result["in_place"] and result["error"] < 1e-5, result


def test_fused_kernels_write_the_split_gradient_in_place_in_interpreter():
    code = (
        "from tests.test_split_gradient import fused_block_gradients\n"
        "result = fused_block_gradients('cpu')\n"
        "assert result['in_place'] and result['error'] < 1e-5, result\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)


class _NoSharing(SharedGradient):
    """Blocks of the wrong width: every consumer allocates its own gradient, and the
    split's backward concatenates (torch.split's behaviour)."""

    def block(self, index: int) -> torch.Tensor:
        return torch.empty(0)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16"])
def test_the_block_gradients_are_those_of_a_concatenating_split_on_gpu(autocast, monkeypatch):
    """TiSSDBlock on CUDA (the fused kernels write into the shared gradient) against the
    same block whose split concatenates. The same values, up to the order of float32
    sums: Triton compiles a kernel per stride class of its arguments (a gradient row of
    324 elements is not a multiple of 16, one of 128 is), and the layout it picks can
    reorder a reduction (seen in bf16: the gated norm's weight gradient, one float32 ulp
    apart in some elements). In float32 every gradient has the same bits."""
    needs_triton_kernels()
    torch.manual_seed(0)
    block = ssd.TiSSDBlock(64, 50, causal_time=True, p2p_residual=True).cuda()
    u = torch.randn(6, 50, 64, device="cuda")
    T = torch.rand(6, block.nheads, 50, device="cuda")

    def gradients():
        block.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out, time_next = block(u, T)
        (out.float().square().sum() + time_next.float().sum()).backward()
        return {name: p.grad.clone() for name, p in block.named_parameters()}

    shared = gradients()
    monkeypatch.setattr(
        ssd, "split_columns", lambda t, widths: (torch.split(t, widths, -1), _NoSharing(t, widths))
    )
    concatenated = gradients()
    errors = {n: relative_error(g, concatenated[n].double().cpu()) for n, g in shared.items()}
    print(f"\n[gpu] shared vs concatenated split gradient, largest: {max(errors.values()):.1e}")
    assert max(errors.values()) < 1e-6, errors
    if not autocast:  # float32: the same bits (H200, call D of 2026-11-28)
        assert all(torch.equal(g, concatenated[n]) for n, g in shared.items()), errors
