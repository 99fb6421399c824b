"""The PyTorch SSD scan against a naive step-by-step recurrence (float64, fresh random inputs)."""

from __future__ import annotations

import pytest
import torch

from ssd import (
    TiSSDBlock,
    even_chunk_size,
    resolve_backend,
    rmsnorm_gated,
    rmsnorm_gated_reference,
    ssd_chunked,
    ssd_recurrent,
    ssd_scan,
)


def random_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=randn(batch, seqlen, nheads, headdim),
        dt=randn(batch, seqlen, nheads),
        A=-torch.rand(nheads, generator=g, dtype=dtype) * 4 - 0.1,
        B=randn(batch, seqlen, ngroups, dstate),
        C=randn(batch, seqlen, ngroups, dstate),
        D=randn(nheads),
        dt_bias=randn(nheads),
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 32])
@pytest.mark.parametrize("seqlen", [1, 7, 32, 50])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_chunked_matches_recurrence(chunk_size, seqlen, ngroups):
    inp = random_inputs(2, seqlen, 4, 8, ngroups, 16, seed=seqlen * 100 + chunk_size)
    y_chunked = ssd_chunked(**inp, chunk_size=chunk_size, dt_softplus=True)
    y_loop = ssd_recurrent(**inp, dt_softplus=True)
    torch.testing.assert_close(y_chunked, y_loop, rtol=1e-10, atol=1e-10)


def test_chunked_without_d_bias_softplus():
    inp = random_inputs(3, 20, 2, 4, 1, 8, seed=3)
    inp["dt"] = inp["dt"].abs()  # a raw step size must be positive without softplus
    kwargs = dict(x=inp["x"], dt=inp["dt"], A=inp["A"], B=inp["B"], C=inp["C"])
    torch.testing.assert_close(
        ssd_chunked(**kwargs, chunk_size=8), ssd_recurrent(**kwargs), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("chunk_size,seqlen", [(4, 10), (32, 50), (16, 16)])
def test_chunked_gradients_match_recurrence(chunk_size, seqlen):
    inp = random_inputs(2, seqlen, 4, 4, 1, 8, seed=7)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    grad_out = torch.randn(2, seqlen, 4, 4, dtype=torch.float64)

    def grads(fn, **kw):
        for v in leaves.values():
            v.grad = None
        (fn(**leaves, dt_softplus=True, **kw) * grad_out).sum().backward()
        return {k: v.grad.clone() for k, v in leaves.items()}

    g_chunked = grads(ssd_chunked, chunk_size=chunk_size)
    g_loop = grads(ssd_recurrent)
    for name in leaves:
        torch.testing.assert_close(g_chunked[name], g_loop[name], rtol=1e-9, atol=1e-9, msg=name)


def test_state_decays_causally():
    """A change at step t leaves every earlier output untouched."""
    inp = random_inputs(1, 40, 2, 4, 1, 8, seed=11)
    y = ssd_chunked(**inp, chunk_size=16, dt_softplus=True)
    inp["x"][:, 25:] += 1.0
    y_changed = ssd_chunked(**inp, chunk_size=16, dt_softplus=True)
    torch.testing.assert_close(y[:, :25], y_changed[:, :25])
    assert not torch.allclose(y[:, 25:], y_changed[:, 25:])


def test_float32_close_to_float64():
    inp = random_inputs(2, 50, 4, 32, 1, 32, seed=5)
    y64 = ssd_chunked(**inp, chunk_size=32, dt_softplus=True)
    y32 = ssd_chunked(**{k: v.float() for k, v in inp.items()}, chunk_size=32, dt_softplus=True)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_rmsnorm_gated_reference_formula():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    w = torch.rand(16, generator=g)
    v = x * z * torch.sigmoid(z)
    expected = w * v / torch.sqrt((v**2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rmsnorm_gated_reference(x, z, w, 1e-5), expected)
    torch.testing.assert_close(rmsnorm_gated(x, z, w, 1e-5, backend="torch"), expected)


def test_dispatch_on_cpu_uses_torch():
    inp = random_inputs(1, 9, 2, 4, 1, 4, dtype=torch.float32)
    y = ssd_scan(**inp, chunk_size=4, backend="auto")
    # 9 steps in 3 chunks of 3 (not 3 x 4 with 3 padded)
    assert torch.equal(y, ssd_chunked(**inp, chunk_size=3, dt_softplus=True))
    torch.testing.assert_close(y, ssd_chunked(**inp, chunk_size=4, dt_softplus=True))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "seqlen, chunk_size, expected",
    [(50, 32, 25), (200, 32, 29), (64, 32, 32), (9, 4, 3), (1, 32, 1), (33, 32, 17), (7, 1, 1)],
)
def test_even_chunk_size_keeps_the_number_of_chunks(seqlen, chunk_size, expected):
    Q = even_chunk_size(seqlen, chunk_size)
    assert Q == expected
    assert -(-seqlen // Q) == -(-seqlen // chunk_size) and Q <= chunk_size


def test_backend_errors_are_clear():
    with pytest.raises(ValueError, match="ssd_backend must be one of"):
        resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="head_dim .* must divide"):
        TiSSDBlock(d_model=64, max_seq_length=10, head_dim=48)


@pytest.mark.parametrize("is_time,p2p", [(True, True), (True, False), (False, False)])
def test_block_shapes_and_time_passthrough(is_time, p2p):
    torch.manual_seed(0)
    block = TiSSDBlock(
        d_model=16,
        max_seq_length=12,
        d_state=8,
        head_dim=8,
        chunk_size=4,
        is_time=is_time,
        p2p_residual=p2p,
    )
    u = torch.randn(3, 12, 16)
    T = torch.randn(3, block.nheads, 12) if is_time else None
    out, T_next = block(u, T)
    assert out.shape == (3, 12, 16)
    if is_time:
        assert T_next.shape == (3, block.nheads, 12)
        # T' is LayerNorm-ed over L: zero mean, unit variance per (row, head) up to the affine init
        torch.testing.assert_close(T_next.mean(-1), torch.zeros(3, block.nheads), atol=1e-5, rtol=0)
    else:
        assert T_next is None
