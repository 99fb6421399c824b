"""The baselines' own layers against straightforward references, on fresh random inputs.

- the parallel linear scan (real and complex) and Mamba-1's selective scan against
  step-by-step loops: outputs and gradients in float64;
- TiSASRec's time intervals and its attention against explicit Python loops;
- the LRU layer against its recurrence written out, and its ring initialisation;
- on a CUDA machine with mamba-ssm: the PyTorch Mamba block against `mamba_ssm.Mamba`;
- Mamba4Rec, TiSASRec, LRURec: predict == full_sort_predict, causal, loss backpropagates.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from recbole.data.interaction import Interaction

from models import selective_scan as ss
from models.lrurec import LRULayer
from models.mamba4rec import MambaMixer, cuda_kernels_available, make_mixer
from models.tisasrec import TimeIntervalAttention, time_intervals
from pipeline.config import CONFIG_DIR
from pipeline.registry import get_model_class

F64 = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


# --------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 8, 13, 50])
def test_linear_scan_matches_loop_real(length):
    gen = torch.Generator().manual_seed(length)
    a = torch.rand(3, length, 4, generator=gen, dtype=F64).requires_grad_()
    b = torch.randn(3, length, 4, generator=gen, dtype=F64).requires_grad_()
    grad = torch.randn(3, length, 4, generator=gen, dtype=F64)
    fast, slow = ss.linear_scan(a, b, dim=1), ss.linear_scan_reference(a, b, dim=1)
    _close(fast, slow)
    for g_fast, g_slow in zip(
        torch.autograd.grad(fast, (a, b), grad), torch.autograd.grad(slow, (a, b), grad)
    ):
        _close(g_fast, g_slow)


@pytest.mark.parametrize("length", [1, 6, 17])
def test_linear_scan_matches_loop_complex_broadcast_decay(length):
    """LRU's case: one complex eigenvalue per channel, broadcast over batch and steps."""
    gen = torch.Generator().manual_seed(100 + length)
    radius = 0.5 + 0.5 * torch.rand(5, generator=gen, dtype=F64)
    phase = 2 * math.pi * torch.rand(5, generator=gen, dtype=F64)
    lam = torch.polar(radius, phase).requires_grad_()  # (5,) complex
    b = torch.randn(2, length, 5, generator=gen, dtype=torch.complex128).requires_grad_()

    def loss(h):  # a real function of complex states, like LRU's output layer
        return (h.real * 1.5 - h.imag * 0.7).square().sum()

    fast = ss.linear_scan(lam[None, None, :], b, dim=1)
    slow = ss.linear_scan_reference(lam[None, None, :], b, dim=1)
    _close(fast, slow)
    for g_fast, g_slow in zip(
        torch.autograd.grad(loss(fast), (lam, b)), torch.autograd.grad(loss(slow), (lam, b))
    ):
        _close(g_fast, g_slow, tol=1e-9)


def test_linear_scan_other_axis():
    a, b = torch.rand(7, 2, dtype=F64), torch.randn(7, 2, dtype=F64)
    _close(ss.linear_scan(a, b, dim=0), ss.linear_scan_reference(a, b, dim=0))


def _selective_inputs(gen, batch, channels, state, length):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    return {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length),
        "A": (-5 * torch.rand(channels, state, generator=gen, dtype=F64)).requires_grad_(),
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": randn(channels),
        "z": randn(batch, channels, length),
        "delta_bias": randn(channels),
    }


@pytest.mark.parametrize("length", [1, 2, 7, 20])
@pytest.mark.parametrize("block_elements", [ss.CPU_BLOCK_ELEMENTS, 1])
def test_selective_scan_matches_step_loop(length, block_elements, monkeypatch):
    """Outputs and all eight gradients, in one block and in one block per batch row."""
    monkeypatch.setattr(ss, "CPU_BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(length)
    inputs = _selective_inputs(gen, batch=3, channels=6, state=4, length=length)
    fast = ss.selective_scan(**inputs, delta_softplus=True)
    slow = ss.selective_scan_reference(**inputs, delta_softplus=True)
    _close(fast, slow)
    grad = torch.randn(fast.shape, generator=gen, dtype=F64)
    names = list(inputs)
    grads_fast = torch.autograd.grad(fast, [inputs[n] for n in names], grad)
    grads_slow = torch.autograd.grad(slow, [inputs[n] for n in names], grad)
    for name, g_fast, g_slow in zip(names, grads_fast, grads_slow):
        assert torch.allclose(g_fast, g_slow, atol=1e-9, rtol=1e-9), name


def test_selective_scan_optional_terms_and_dtype():
    gen = torch.Generator().manual_seed(7)
    inputs = _selective_inputs(gen, batch=2, channels=3, state=5, length=9)
    for key in ("D", "z", "delta_bias"):
        inputs.pop(key)
    fast = ss.selective_scan(**inputs)
    _close(fast, ss.selective_scan_reference(**inputs))
    half = {k: v.detach().float() for k, v in inputs.items()}
    assert ss.selective_scan(**half).dtype == torch.float32


def test_selective_scan_rejects_bad_shapes():
    u = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(B, D, L\)"):
        ss.selective_scan(u, torch.randn(2, 3, 5), -torch.ones(3, 2), u, u)
    with pytest.raises(ValueError, match="A must be"):
        ss.selective_scan(u, u, -torch.ones(4, 2), u, u)


def test_mamba_mixer_matches_reference_scan(monkeypatch):
    """The whole Mamba block: parallel scan vs the step loop, same weights (float64)."""
    torch.manual_seed(0)
    mixer = MambaMixer(d_model=16, d_state=4, d_conv=4, expand=2).double()
    x = torch.randn(3, 11, 16, dtype=F64)
    fast = mixer(x)

    def reference(*args, backend=None, **kwargs):  # the loop has a single backend
        return ss.selective_scan_reference(*args, **kwargs)

    monkeypatch.setattr("models.mamba4rec.selective_scan", reference)
    _close(fast, mixer(x))
    assert fast.shape == x.shape


def test_mamba_mixer_is_causal():
    torch.manual_seed(1)
    mixer = MambaMixer(d_model=8, d_state=4).double()
    x = torch.randn(2, 10, 8, dtype=F64)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 8, dtype=F64)
    _close(mixer(x)[:, :6], mixer(changed)[:, :6])


def test_make_mixer_choices():
    cpu = torch.device("cpu")
    assert isinstance(make_mixer(8, 4, 4, 2, backend="auto", device=cpu), MambaMixer)
    assert isinstance(make_mixer(8, 4, 4, 2, backend="torch", device=cpu), MambaMixer)
    with pytest.raises(ValueError, match="mamba_backend must be one of"):
        make_mixer(8, 4, 4, 2, backend="mamba", device=cpu)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_mixer(8, 4, 4, 2, backend="triton", device=cpu)
    if not cuda_kernels_available():
        with pytest.raises(ImportError, match="selective_scan_cuda"):
            make_mixer(8, 4, 4, 2, backend="cuda", device=cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_kernels_available(), reason="needs mamba-ssm's selective_scan_cuda")
def test_pytorch_mamba_matches_mamba_ssm_on_gpu():
    from mamba_ssm.modules.mamba_simple import Mamba

    torch.manual_seed(0)
    reference = Mamba(d_model=64, d_state=32, d_conv=4, expand=2).cuda()
    ours = MambaMixer(d_model=64, d_state=32, d_conv=4, expand=2).cuda()
    ours.load_state_dict(reference.state_dict())  # same parameter names and shapes
    x = torch.randn(8, 50, 64, device="cuda", requires_grad=True)
    y_ref, y_ours = reference(x), ours(x)
    assert torch.allclose(y_ref, y_ours, atol=1e-3, rtol=1e-3), (y_ref - y_ours).abs().max()
    grad = torch.randn_like(y_ref)
    (g_ref,) = torch.autograd.grad(y_ref, x, grad)
    (g_ours,) = torch.autograd.grad(y_ours, x, grad)
    assert torch.allclose(g_ref, g_ours, atol=1e-3, rtol=1e-3), (g_ref - g_ours).abs().max()


# --------------------------------------------------------------------------------------
# TiSASRec
# --------------------------------------------------------------------------------------


def _intervals_loop(times: list[float], length: int, time_span: int) -> list[list[int]]:
    """Li et al.'s definition for one user: gaps in units of the smallest nonzero gap."""
    gaps = [abs(b - a) for a, b in zip(times, times[1:]) if b != a]
    scale = min(gaps) if gaps else 1.0
    steps = [round((t - times[0]) / scale) for t in times]
    out = [[0] * length for _ in range(length)]
    for i, s_i in enumerate(steps):
        for j, s_j in enumerate(steps):
            out[i][j] = min(abs(s_i - s_j), time_span)
    return out


def test_time_intervals_match_loop():
    gen = torch.Generator().manual_seed(3)
    length, span = 9, 6
    rows, lens = [], [9, 5, 1, 4]
    for n in lens:
        gaps = torch.randint(0, 4, (n,), generator=gen).double() * 60.0  # zero gaps included
        times = 8.8e8 + torch.cumsum(gaps, 0)
        rows.append(torch.cat([times, torch.zeros(length - n, dtype=F64)]))
    timestamps, seq_len = torch.stack(rows), torch.tensor(lens)
    got = time_intervals(timestamps, seq_len, span)
    assert got.dtype == torch.int64
    for b, n in enumerate(lens):
        want = _intervals_loop(timestamps[b, :n].tolist(), length, span)
        assert got[b].tolist() == want


def test_time_intervals_scale_and_clip():
    t = torch.tensor([[100.0, 130.0, 130.0, 190.0, 100000.0]])
    r = time_intervals(t, torch.tensor([5]), time_span=10)
    assert r[0, 0].tolist() == [0, 1, 1, 3, 10]  # smallest gap 30 s is one unit; clipped at 10


def _attention_loop(attn, queries, keys, pos_k, pos_v, time_k, time_v, allowed):
    """e_ij = q_i.(k_j + p^K_j + r^K_ij)/sqrt(d_h); z_i = sum_j a_ij (v_j + p^V_j + r^V_ij)."""
    batch, length, d = queries.shape
    h, dh = attn.n_heads, attn.head_dim
    q_all, k_all, v_all = attn.query(queries), attn.key(keys), attn.value(keys)
    out = torch.zeros(batch, length, d, dtype=queries.dtype)
    for b in range(batch):
        for head in range(h):
            cols = slice(head * dh, (head + 1) * dh)
            for i in range(length):
                js = [j for j in range(length) if allowed[b, i, j]]
                scores = []
                for j in js:
                    key = k_all[b, j, cols] + pos_k[j, cols] + time_k[b, i, j, cols]
                    scores.append(torch.dot(q_all[b, i, cols], key) / math.sqrt(dh))
                weights = torch.softmax(torch.stack(scores), dim=0)
                for w, j in zip(weights, js):
                    value = v_all[b, j, cols] + pos_v[j, cols] + time_v[b, i, j, cols]
                    out[b, i, cols] += w * value
    return out


@pytest.mark.parametrize("n_heads", [1, 2])
def test_time_interval_attention_matches_loop(n_heads):
    torch.manual_seed(n_heads)
    batch, length, d = 2, 6, 8
    attn = TimeIntervalAttention(d, n_heads, attn_dropout=0.0).double().eval()
    queries, keys = (
        torch.randn(batch, length, d, dtype=F64),
        torch.randn(batch, length, d, dtype=F64),
    )
    pos_k, pos_v = torch.randn(length, d, dtype=F64), torch.randn(length, d, dtype=F64)
    time_k = torch.randn(batch, length, length, d, dtype=F64)
    time_v = torch.randn(batch, length, length, d, dtype=F64)
    seq_len = torch.tensor([6, 4])
    real = torch.arange(length)[None, :] < seq_len[:, None]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed = causal[None] & real[:, None, :]
    inputs = (queries, keys, pos_k, pos_v, time_k, time_v, allowed)
    got = attn(*inputs)
    want = _attention_loop(attn, *inputs)
    _close(got, want)


# --------------------------------------------------------------------------------------
# LRURec
# --------------------------------------------------------------------------------------


def test_lru_ring_initialisation():
    torch.manual_seed(0)
    layer = LRULayer(d_model=512, dropout=0.0, r_min=0.8, r_max=0.99, max_phase=math.pi)
    lam = layer.eigenvalues().detach()
    assert lam.abs().min() >= 0.8 - 1e-6 and lam.abs().max() <= 0.99 + 1e-6
    assert lam.angle().min() >= 0 and lam.angle().max() <= math.pi + 1e-6
    gamma = torch.exp(layer.gamma_log.detach())
    _close(gamma.double(), torch.sqrt(1 - lam.abs().double() ** 2), tol=1e-5)
    with pytest.raises(ValueError, match="r_min < r_max"):
        LRULayer(d_model=4, dropout=0.0, r_min=0.9, r_max=0.5, max_phase=1.0)


def test_lru_layer_matches_recurrence_loop():
    torch.manual_seed(2)
    d = 6
    layer = LRULayer(d_model=d, dropout=0.0, r_min=0.5, r_max=0.95, max_phase=2 * math.pi)
    layer = layer.double().eval()
    x = torch.randn(2, 7, d, dtype=F64)
    lam = layer.eigenvalues()
    re, im = layer.in_proj(x).chunk(2, dim=-1)
    drive = torch.complex(re, im) * torch.exp(layer.gamma_log)
    state = torch.zeros(2, d, dtype=torch.complex128)
    outputs = []
    for t in range(x.size(1)):
        state = lam * state + drive[:, t]
        outputs.append(layer.out_proj(torch.cat([state.real, state.imag], dim=-1)))
    want = layer.layer_norm(torch.stack(outputs, dim=1) + x)
    _close(layer(x), want)


# --------------------------------------------------------------------------------------
# Whole models: scoring paths agree
# --------------------------------------------------------------------------------------


class _Dataset:
    def num(self, field: str) -> int:
        return 30  # 29 items + PAD


def _model_config(model: str) -> dict:
    config = {
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length",
        "NEG_PREFIX": "neg_",
        "TIME_FIELD": "timestamp",
        "MAX_ITEM_LIST_LENGTH": 7,
        "device": torch.device("cpu"),
        "loss_type": "CE",
    }
    config.update(yaml.safe_load((CONFIG_DIR / "model" / f"{model}.yaml").read_text()))
    config.update(hidden_size=16, d_state=4)
    return config


@pytest.mark.parametrize("model_name", ["Mamba4Rec", "TiSASRec", "LRURec"])
def test_model_predict_agrees_with_full_sort_and_loss_trains(model_name):
    torch.manual_seed(0)
    model = get_model_class(model_name)(_model_config(model_name), _Dataset()).eval()
    seq_len = torch.tensor([7, 3, 1])
    items = torch.randint(1, 30, (3, 7)) * (torch.arange(7)[None, :] < seq_len[:, None])
    times = (8.8e8 + torch.cumsum(torch.randint(0, 5000, (3, 7)), 1).float()) * (items > 0)
    batch = Interaction(
        {
            "item_id_list": items,
            "item_length": seq_len,
            "timestamp_list": times,
            "item_id": torch.tensor([4, 9, 29]),
        }
    )
    scores = model.full_sort_predict(batch)  # (3, 30)
    assert scores.shape == (3, 30)
    assert torch.allclose(
        model.predict(batch), scores[torch.arange(3), batch["item_id"]], atol=1e-5
    )
    # Whatever follows the real prefix does not change a user's scores (causal models).
    changed = Interaction({**{k: batch[k] for k in batch.columns}, "item_id_list": items.clone()})
    changed["item_id_list"][1, 3:] = 5  # items after user 1's history (length 3)
    assert torch.allclose(model.full_sort_predict(changed)[1], scores[1], atol=1e-5)
    model.train()
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.item_embedding.weight.grad.abs().sum() > 0
