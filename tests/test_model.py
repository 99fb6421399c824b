"""TiM4Rec as a RecBole model: shapes, loss, prediction consistency, padding, time path."""

from __future__ import annotations

import pytest
import torch
from recbole.data import create_dataset
from recbole.data.interaction import Interaction

from pipeline.config import build_config
from tim4rec import SSD4Rec, TiM4Rec, TimeGapEncoder

L = 12


def make_model(model_class, data_path, **overrides):
    config = build_config(
        model_class,
        [],
        {
            "dataset": "ml-slice",
            "data_path": str(data_path),
            "MAX_ITEM_LIST_LENGTH": L,
            "hidden_size": 16,
            "d_state": 8,
            "head_dim": 8,
            "chunk_size": 4,
            **overrides,
        },
    )
    dataset = create_dataset(config)
    torch.manual_seed(0)
    return model_class(config, dataset).eval(), config, dataset


def batch(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    seq = torch.zeros(n, L, dtype=torch.long)
    times = torch.zeros(n, L)
    for i, length in enumerate(lengths):
        seq[i, :length] = torch.randint(1, model.n_items, (length,), generator=g)
        gaps = torch.randint(1, 10**6, (length,), generator=g).float()
        times[i, :length] = 8.8e8 + torch.cumsum(gaps, 0)
    return Interaction(
        {
            model.ITEM_SEQ: seq,
            model.ITEM_SEQ_LEN: torch.tensor(lengths),
            model.time_field: times,
            model.POS_ITEM_ID: torch.randint(1, model.n_items, (n,), generator=g),
            model.ITEM_ID: torch.randint(1, model.n_items, (n,), generator=g),
        }
    )


@pytest.mark.parametrize("model_class", [TiM4Rec, SSD4Rec])
def test_shapes_loss_and_predictions_agree(model_class, ml100k_slice):
    model, _, _ = make_model(model_class, ml100k_slice)
    inter = batch(model, [3, L, 1, 7])
    scores = model.full_sort_predict(inter)
    assert scores.shape == (4, model.n_items)
    loss = model.calculate_loss(inter)
    expected = torch.nn.functional.cross_entropy(scores, inter[model.POS_ITEM_ID])
    torch.testing.assert_close(loss, expected)
    picked = scores.gather(1, inter[model.ITEM_ID][:, None]).squeeze(1)
    torch.testing.assert_close(model.predict(inter), picked, rtol=1e-5, atol=1e-5)


def test_loss_backward_reaches_every_parameter(ml100k_slice):
    model, _, _ = make_model(TiM4Rec, ml100k_slice, p2p_residual=True)
    model.train()
    model.calculate_loss(batch(model, [5, L, 2])).backward()
    frozen = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    # The last layer's T' (time_gate, time_norm) feeds nothing, as in the official model.
    last = f"layers.{model.num_layers - 1}.block."
    assert frozen == [
        last + n
        for n in ("time_gate.1.weight", "time_gate.1.bias", "time_norm.weight", "time_norm.bias")
    ]


@pytest.mark.parametrize(
    "model_class,overrides",
    [(SSD4Rec, {}), (TiM4Rec, {"time_encoding": "corrected"})],
)
def test_padding_does_not_change_last_position(model_class, overrides, ml100k_slice):
    """What sits after the last real item (padding slots) cannot reach the user vector."""
    model, _, _ = make_model(model_class, ml100k_slice, **overrides)
    inter = batch(model, [4, 9])
    before = model.full_sort_predict(inter)
    seq, times = inter[model.ITEM_SEQ].clone(), inter[model.time_field].clone()
    seq[0, 4:] = 5  # garbage where padding was
    times[0, 4:] = 123.0
    inter.interaction[model.ITEM_SEQ] = seq
    inter.interaction[model.time_field] = times
    torch.testing.assert_close(model.full_sort_predict(inter), before)


def test_time_path_changes_scores_and_ssd4rec_ignores_time(ml100k_slice):
    tim, _, _ = make_model(TiM4Rec, ml100k_slice)
    ssd, _, _ = make_model(SSD4Rec, ml100k_slice)
    assert tim.is_time and not ssd.is_time
    # At init the time path moves the scores by ~1e-15 (theta ~ 1e-5 scales dt_raw, and x, B,
    # C are ~0.02): larger weights make its wiring visible.
    tim.double()
    with torch.no_grad():
        for name, p in tim.named_parameters():
            if "time_mlp" in name or "time_conv" in name or "in_proj.weight" in name:
                p.normal_(0, 0.5)
    assert not any("time" in name for name, _ in ssd.named_parameters())
    inter = batch(tim, [6, 10])
    other_times = batch(tim, [6, 10], seed=1)[tim.time_field].double()
    inter.interaction[tim.time_field] = inter[tim.time_field].double()
    tim_before, ssd_before = tim.full_sort_predict(inter), ssd.full_sort_predict(inter)
    inter.interaction[tim.time_field] = other_times
    assert (tim.full_sort_predict(inter) - tim_before).abs().max() > 1e-6
    torch.testing.assert_close(ssd.full_sort_predict(inter), ssd_before)


def test_paper_encoding_sees_the_padding_boundary(ml100k_slice):
    """The official encoding: the first padding slot holds -t_last, which dominates the norm."""
    model, _, _ = make_model(TiM4Rec, ml100k_slice)
    inter = batch(model, [4])
    times, lengths = inter[model.time_field], inter[model.ITEM_SEQ_LEN]
    signal = model.time_encoder(times, lengths)  # (B, H, L)
    assert signal[0, 0].argmin().item() == 4  # the -t_last gap
    corrected = TimeGapEncoder(L, 2, 0.0, "corrected").eval()
    assert torch.all(corrected(times, lengths)[0, :, 4:] == 0)


def test_init_follows_spec(ml100k_slice):
    model, config, _ = make_model(TiM4Rec, ml100k_slice)
    emb = model.item_embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.003
    block = model.layers[0].block
    assert torch.all(block.in_proj.bias == 0)
    assert torch.all(block.D == 1)
    A = torch.exp(block.A_log)
    assert torch.all((A >= 1) & (A <= 16))
    dt0 = torch.nn.functional.softplus(block.dt_bias)
    assert torch.all((dt0 >= 1e-4 * 0.999) & (dt0 <= 0.1 * 1.001))
    assert model.layers[0].ffn.layer_norm.eps == 1e-12


def test_unknown_time_encoding_and_loss_rejected(ml100k_slice):
    with pytest.raises(ValueError, match="time_encoding must be one of"):
        make_model(TiM4Rec, ml100k_slice, time_encoding="log")
    with pytest.raises(ValueError, match="loss_type: CE"):
        make_model(TiM4Rec, ml100k_slice, loss_type="BPR", train_neg_sample_args={"uniform": 1})
