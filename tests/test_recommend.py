"""recommend.py (export for the dataset's users) and pipeline.inference.Recommender (new histories).

References are computed independently: histories straight from the atomic file with pandas,
scores from the model's own `full_sort_predict`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.data import create_dataset
from recbole.data.interaction import Interaction

import recommend
from pipeline.checkpoint import save_checkpoint
from pipeline.config import build_config
from pipeline.inference import InferenceError, Recommender
from tim4rec import SSD4Rec, TiM4Rec

L = 32  # ml-100k users have 20+ interactions: some histories fill L, some do not
TINY = {
    "dataset": "ml-slice",
    "MAX_ITEM_LIST_LENGTH": L,
    "hidden_size": 16,
    "d_state": 8,
    "head_dim": 8,
    "chunk_size": 8,
    "num_layers": 1,
    # No k-core filter, so that the reference below can read the atomic file as it is.
    "user_inter_num_interval": "[0,inf)",
    "item_inter_num_interval": "[0,inf)",
    "show_progress": False,
}


def make_checkpoint(model_class, data_path, path):
    """A checkpoint with the fields inference reads, around a model with well-spread scores."""
    config = build_config(model_class, [], {**TINY, "data_path": str(data_path)})
    dataset = create_dataset(config)
    torch.manual_seed(0)
    model = model_class(config, dataset)
    with torch.no_grad():  # init scores are near-ties and the time path is ~silent: widen both
        model.item_embedding.weight.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if "time_mlp" in name or "time_conv" in name or "in_proj.weight" in name:
                p.normal_(0, 0.5)
    save_checkpoint(
        path,
        {
            "identity": {
                "model": model_class.__name__,
                "dataset": "ml-slice",
                "n_users": int(dataset.user_num),
                "n_items": int(dataset.item_num),
            },
            "config": dict(TINY),  # as the trainer stores it: no data_path
            "item_tokens": [str(t) for t in dataset.field2id_token[dataset.iid_field]],
            "state_dict": model.state_dict(),
        },
    )
    return model.eval()


@pytest.fixture(scope="module")
def tim(ml100k_slice, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "TiM4Rec-ml-slice.pth"
    return make_checkpoint(TiM4Rec, ml100k_slice, path), path


@pytest.fixture(scope="module")
def ssd(ml100k_slice, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "SSD4Rec-ml-slice.pth"
    return make_checkpoint(SSD4Rec, ml100k_slice, path), path


@pytest.fixture(scope="module")
def sequences(ml100k_slice):
    """user -> (raw item ids, float32 timestamps), oldest first, ties in file order (as RecBole)."""
    frame = pd.read_csv(ml100k_slice / "ml-slice" / "ml-slice.inter", sep="\t", dtype=str)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    frame["t"] = frame["timestamp"].astype(np.float64).astype(np.float32)  # RecBole sorts float32
    frame = frame.sort_values("t", kind="stable")
    return {
        user: (group["item_id"].tolist(), group["t"].to_numpy())
        for user, group in frame.groupby("user_id", sort=False)
    }


def item_tokens(path) -> list[str]:
    return torch.load(path, weights_only=True)["item_tokens"]


def reference_scores(model, tokens, histories) -> torch.Tensor:
    """full_sort_predict on histories of raw ids, last L kept, laid out by hand. (B, V)"""
    index = {token: i for i, token in enumerate(tokens)}
    seq = torch.zeros(len(histories), L, dtype=torch.long)
    times = torch.zeros(len(histories), L)
    lengths = torch.zeros(len(histories), dtype=torch.long)
    for row, (items, ts) in enumerate(histories):
        items, ts = items[-L:], ts[-L:]
        seq[row, : len(items)] = torch.tensor([index[i] for i in items])
        times[row, : len(items)] = torch.as_tensor(np.asarray(ts, dtype=np.float32))
        lengths[row] = len(items)
    inter = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths, model.time_field: times})
    with torch.no_grad():
        return model.full_sort_predict(inter)


def reference_top_k(model, tokens, histories, k, exclude=False):
    scores = reference_scores(model, tokens, histories)
    scores[:, 0] = -torch.inf
    if exclude:
        index = {token: i for i, token in enumerate(tokens)}
        for row, (items, _) in enumerate(histories):
            scores[row, [index[i] for i in items]] = -torch.inf
    values, top = scores.topk(k, dim=1)
    return [[tokens[i] for i in row] for row in top.tolist()], values.numpy()


def run_cli(*args) -> int:
    return recommend.main([str(a) for a in args])


def read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"user_id": str, "item_id": str})


def common_args(path, data_path, tmp_path):
    return ["--checkpoint", path, f"--data_path={data_path}", f"--checkpoint_dir={tmp_path}"]


# --- recommend.py ---------------------------------------------------------------------------


def test_export_equals_full_sort_predict_ranking(tim, sequences, ml100k_slice, tmp_path):
    model, path = tim
    out = tmp_path / "top.csv"
    # batch size 7: many batches, the last one partial
    assert run_cli(*common_args(path, ml100k_slice, tmp_path), "--output", out, "--k", 5,
                   "--batch-size", 7) == 0  # fmt: skip
    table = read_csv(out)
    assert list(table.columns) == ["user_id", "rank", "item_id", "score"]
    users = list(dict.fromkeys(table["user_id"]))
    assert sorted(users) == sorted(sequences)  # raw user ids, every user once
    assert (table["rank"].to_numpy().reshape(-1, 5) == np.arange(1, 6)).all()
    want, want_scores = reference_top_k(model, item_tokens(path), [sequences[u] for u in users], 5)
    got = table.groupby("user_id", sort=False)["item_id"].apply(list).loc[users].tolist()
    assert got == want  # same raw ids, same order; "[PAD]" never appears
    np.testing.assert_allclose(table["score"].to_numpy().reshape(-1, 5), want_scores, rtol=1e-5)


def test_exclude_history_removes_exactly_the_history(tim, sequences, ml100k_slice, tmp_path):
    model, path = tim
    out = tmp_path / "top.csv"
    keys = list(sequences)
    asked = [keys[7], keys[0], keys[42], keys[7], keys[-1]]  # asked order kept, duplicates once
    base = [*common_args(path, ml100k_slice, tmp_path), "--k", 20, "--users", ",".join(asked)]
    assert run_cli(*base, "--output", out, "--exclude-history") == 0
    table = read_csv(out)
    users = [keys[7], keys[0], keys[42], keys[-1]]
    assert list(dict.fromkeys(table["user_id"])) == users
    hist = [sequences[u] for u in users]
    want, _ = reference_top_k(model, item_tokens(path), hist, 20, exclude=True)
    got = table.groupby("user_id", sort=False)["item_id"].apply(list).loc[users].tolist()
    assert got == want
    for user, items in zip(users, got):
        assert not set(items) & set(sequences[user][0])  # whole history, not just the last L
    # Without the option, the same users' lists are the unmasked ranking, history included.
    assert run_cli(*base, "--output", tmp_path / "all.csv") == 0
    full = read_csv(tmp_path / "all.csv").groupby("user_id", sort=False)["item_id"].apply(list)
    assert full.loc[users].tolist() == reference_top_k(model, item_tokens(path), hist, 20)[0]
    assert any(set(full[u]) & set(sequences[u][0]) for u in users)


def test_export_agrees_with_the_api_on_the_full_history(tim, sequences, ml100k_slice, tmp_path):
    _, path = tim
    out = tmp_path / "top.csv"
    assert run_cli(*common_args(path, ml100k_slice, tmp_path), "--output", out, "--k", 10,
                   "--users", "196,99") == 0  # fmt: skip
    table = read_csv(out)
    rec = Recommender.from_checkpoint(path)
    for user in ("196", "99"):
        items, times = sequences[user]
        rows = table[table["user_id"] == user]
        api = rec.recommend(items, times, k=10)
        assert rows["item_id"].tolist() == [item for item, _ in api]
        np.testing.assert_allclose(rows["score"], [s for _, s in api], rtol=1e-5)


def test_users_file_and_parquet(tim, ml100k_slice, tmp_path):
    pytest.importorskip("pyarrow")
    _, path = tim
    (tmp_path / "users.txt").write_text("5\n\n186\n")
    args = [*common_args(path, ml100k_slice, tmp_path), "--users-file", tmp_path / "users.txt"]
    assert run_cli(*args, "--output", tmp_path / "top.csv") == 0
    assert run_cli(*args, "--output", tmp_path / "top.parquet") == 0  # format from the name
    parquet = pd.read_parquet(tmp_path / "top.parquet")
    pd.testing.assert_frame_equal(
        parquet, read_csv(tmp_path / "top.csv"), check_dtype=False, rtol=1e-6
    )


def test_parquet_without_pyarrow_is_a_clear_error(tim, ml100k_slice, tmp_path, monkeypatch, capsys):
    _, path = tim
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    out = tmp_path / "top.parquet"
    assert run_cli(*common_args(path, ml100k_slice, tmp_path), "--output", out) == 2
    assert "pip install pyarrow" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_users_are_listed(tim, ml100k_slice, tmp_path, capsys):
    _, path = tim
    out = tmp_path / "top.csv"
    code = run_cli(*common_args(path, ml100k_slice, tmp_path), "--output", out,
                   "--users", "1,nobody,999999,22")  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "2 of 4 user ids are not in dataset 'ml-slice'" in err
    assert "'nobody'" in err and "'999999'" in err
    assert not out.exists()


def test_missing_data_is_a_clear_error(tim, tmp_path, capsys):
    _, path = tim
    out = tmp_path / "top.csv"
    code = run_cli("--checkpoint", path, "--output", out, f"--data_path={tmp_path / 'nothing'}",
                   f"--checkpoint_dir={tmp_path}")  # fmt: skip
    assert code == 2
    assert "dataset 'ml-slice' not found" in capsys.readouterr().err
    assert not out.exists()


def test_bad_k_and_arguments(tim, ml100k_slice, tmp_path, capsys):
    _, path = tim
    out = tmp_path / "top.csv"
    assert run_cli(*common_args(path, ml100k_slice, tmp_path), "--output", out, "--k", 0) == 2
    assert "k must be an integer from 1 to" in capsys.readouterr().err
    assert run_cli(*common_args(path, ml100k_slice, tmp_path), "--output", out, "stray") == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err
    assert not out.exists()


def test_output_is_atomic(tim, ml100k_slice, tmp_path, monkeypatch):
    """A failure mid-stream leaves the previous file as it was and no temporary file."""
    model, path = tim
    out = tmp_path / "top.csv"
    out.write_text("previous\n")
    calls = {"n": 0}
    real = TiM4Rec.full_sort_predict

    def fail_on_third_batch(self, interaction):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(self, interaction)

    monkeypatch.setattr(TiM4Rec, "full_sort_predict", fail_on_third_batch)
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(*common_args(path, ml100k_slice, tmp_path), "--output", out, "--batch-size", 10)
    assert calls["n"] == 3
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir() if "top.csv" in p.name) == ["top.csv"]


# --- Recommender ----------------------------------------------------------------------------


def random_history(tokens, length, seed):
    g = np.random.default_rng(seed)
    items = [tokens[i] for i in g.integers(1, len(tokens), size=length)]
    times = 8.8e8 + np.cumsum(g.integers(0, 10**6, size=length))  # ties allowed
    return items, times.tolist()


def test_api_needs_no_data_and_scores_like_full_sort_predict(tim):
    model, path = tim
    rec = Recommender.from_checkpoint(path)  # the stored config has no data_path: nothing read
    tokens = item_tokens(path)
    assert rec.item_ids == tokens[1:]
    histories = [random_history(tokens, n, seed) for seed, n in enumerate([1, 5, L, L + 9])]
    want = reference_scores(model, tokens, histories)  # the last L items of the long one
    for (items, times), row in zip(histories, want):
        got = rec.score(items, times)
        torch.testing.assert_close(got[1:], row[1:], rtol=1e-5, atol=1e-5)
        assert got[0] == -torch.inf
        top = rec.recommend(items, times, k=10)
        order = torch.argsort(row[1:], descending=True)[:10] + 1
        assert [item for item, _ in top] == [tokens[i] for i in order]
        np.testing.assert_allclose([s for _, s in top], row[order].numpy(), rtol=1e-5)
    batch = rec.recommend_batch([h[0] for h in histories], [h[1] for h in histories], k=10,
                                batch_size=3)  # fmt: skip
    assert [[i for i, _ in r] for r in batch] == [
        [i for i, _ in rec.recommend(items, times, k=10)] for items, times in histories
    ]


def test_api_feeds_time_to_tim4rec_and_ssd4rec_ignores_it(tim, ssd):
    _, tim_path = tim
    _, ssd_path = ssd
    tokens = item_tokens(tim_path)
    items, times = random_history(tokens, L + 3, seed=3)
    rec = Recommender.from_checkpoint(tim_path)
    seen = []
    rec.model.time_encoder.register_forward_hook(lambda mod, args, out: seen.append(args))
    rec.recommend(items, times)
    fed, lengths = seen[0]  # (1, L) timestamps and lengths, as RecBole pads them
    want = torch.as_tensor(np.asarray(times[-L:], dtype=np.float32))
    assert lengths.tolist() == [L] and torch.equal(fed[0], want)
    with pytest.raises(InferenceError, match="pass timestamps="):
        rec.recommend(items)
    ssd_rec = Recommender.from_checkpoint(ssd_path)
    without = ssd_rec.score(items)  # SSD4Rec needs no timestamps
    torch.testing.assert_close(ssd_rec.score(items, times), without)


def test_api_exclude_seen(tim):
    model, path = tim
    tokens = item_tokens(path)
    items, times = random_history(tokens, L + 20, seed=5)  # exclusion covers items beyond L too
    rec = Recommender.from_checkpoint(path)
    top = [item for item, _ in rec.recommend(items, times, k=50, exclude_seen=True)]
    assert not set(top) & set(items)
    assert top == reference_top_k(model, tokens, [(items, times)], 50, exclude=True)[0][0]
    batch = rec.recommend_batch([items, items[:3]], [times, times[:3]], k=50, exclude_seen=True)
    assert [i for i, _ in batch[0]] == top
    assert not {i for i, _ in batch[1]} & set(items[:3])


def test_api_unknown_items_raise_or_drop_with_warning(tim):
    _, path = tim
    tokens = item_tokens(path)
    items, times = random_history(tokens, 6, seed=7)
    rec = Recommender.from_checkpoint(path)
    dirty = items[:2] + ["no-such-item"] + items[2:] + ["[PAD]"]
    dirty_times = times[:2] + [times[2]] + times[2:] + [times[-1]]
    with pytest.raises(InferenceError, match=r"2 item id\(s\) not in .*'no-such-item', '\[PAD\]'"):
        rec.recommend(dirty, dirty_times)
    with pytest.warns(UserWarning, match="'no-such-item'.*dropped"):
        dropped = rec.recommend(dirty, dirty_times, unknown="drop")
    assert dropped == rec.recommend(items, times)
    assert rec.recommend([int(items[0])], [times[0]]) == rec.recommend(items[:1], times[:1])
    with pytest.raises(InferenceError, match="no known item is left"):
        rec.recommend(["x", "y"], [1, 2], unknown="drop")
    with pytest.raises(InferenceError, match="history 1: 1 item id"):
        rec.recommend_batch([items, ["x"]], [times, [1]])


def test_api_bad_timestamps_and_k(tim):
    _, path = tim
    tokens = item_tokens(path)
    items, times = random_history(tokens, 5, seed=9)
    rec = Recommender.from_checkpoint(path)
    swapped = [times[0], times[2], times[1] - 1, times[3], times[4]]
    with pytest.raises(InferenceError, match="back in time at position 2.*sort the items by time"):
        rec.recommend(items, swapped)
    with pytest.raises(InferenceError, match="5 item ids but 4 timestamps"):
        rec.recommend(items, times[:4])
    with pytest.raises(InferenceError, match="finite"):
        rec.recommend(items, times[:4] + [float("nan")])
    with pytest.raises(InferenceError, match="history is empty"):
        rec.recommend([], [])
    with pytest.raises(InferenceError, match="k must be an integer from 1 to"):
        rec.recommend(items, times, k=len(tokens))
    with pytest.raises(InferenceError, match="unknown must be one of"):
        rec.recommend(items, times, unknown="ignore")


def test_api_leaves_the_callers_rng_alone(tim):
    _, path = tim
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Recommender.from_checkpoint(path)
    torch.testing.assert_close(torch.rand(3), expected)


def test_api_leaves_cuda_visible_devices_alone(tim, monkeypatch):
    """RecBole's Config sets CUDA_VISIBLE_DEVICES from gpu_id; the API must not."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    Recommender.from_checkpoint(tim[1])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    Recommender.from_checkpoint(tim[1])
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_api_cuda_without_cuda_is_a_clear_error(tim):
    with pytest.raises(InferenceError, match="CUDA is not available"):
        Recommender.from_checkpoint(tim[1], device="cuda")


@pytest.mark.gpu
def test_api_same_on_gpu(tim):
    _, path = tim
    tokens = item_tokens(path)
    histories = [random_history(tokens, n, seed) for seed, n in enumerate([3, L + 4])]
    cpu = Recommender.from_checkpoint(path, device="cpu")
    gpu = Recommender.from_checkpoint(path, device="cuda")
    for items, times in histories:
        torch.testing.assert_close(gpu.score(items, times), cpu.score(items, times),
                                   rtol=1e-3, atol=1e-3)  # fmt: skip
        assert [i for i, _ in gpu.recommend(items, times, k=5)] == [
            i for i, _ in cpu.recommend(items, times, k=5)
        ]


def test_api_under_bf16_autocast_returns_float_scores(tim):
    """Scores of a bf16 forward (a caller's autocast) come back as Python floats, in the
    float32 order of the bf16 values."""
    _, path = tim
    rec = Recommender.from_checkpoint(path)
    items, times = random_history(item_tokens(path), 6, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        top = rec.recommend(items, times, k=5)
    scores = [s for _, s in top]
    assert len(top) == 5 and all(isinstance(s, float) for s in scores)
    assert scores == sorted(scores, reverse=True)


@pytest.mark.gpu
def test_cuda_graph_matches_eager(tim):
    _, path = tim
    tokens = item_tokens(path)
    graph = Recommender.from_checkpoint(path, device="cuda")
    eager = Recommender.from_checkpoint(path, device="cuda", cuda_graph=False)
    assert graph._graph is not None and eager._graph is None
    for seed, n in enumerate([1, 7, L + 5]):
        items, times = random_history(tokens, n, seed)
        torch.testing.assert_close(graph.score(items, times), eager.score(items, times))
        assert graph.recommend(items, times, exclude_seen=True) == eager.recommend(
            items, times, exclude_seen=True
        )


def test_cuda_graph_needs_cuda(tim):
    with pytest.raises(InferenceError, match="cuda_graph=True needs a CUDA device"):
        Recommender.from_checkpoint(tim[1], cuda_graph=True)


@pytest.mark.slow
def test_trained_checkpoint_end_to_end(tmp_path):
    """A checkpoint written by run.py's trainer works in recommend.py and the API alike."""
    from conftest import write_slice

    from pipeline.data import BUNDLED
    from pipeline.runner import train

    data = write_slice(tmp_path / "data", "ml-slice", BUNDLED["ml-100k"] / "ml-100k.inter", 40)
    overrides = {**TINY, "data_path": str(data), "checkpoint_dir": str(tmp_path),
                 "epochs": 1, "train_batch_size": 512, "eval_batch_size": 512}  # fmt: skip
    checkpoint = train("TiM4Rec", [], overrides)["checkpoint"]
    out = tmp_path / "top.csv"
    assert run_cli(*common_args(checkpoint, data, tmp_path), "--output", out,
                   "--users", "196,22") == 0  # fmt: skip
    table = read_csv(out)
    assert len(table) == 20 and set(table["user_id"]) == {"196", "22"}
    rec = Recommender.from_checkpoint(checkpoint)
    items = table[table["user_id"] == "196"]["item_id"].tolist()
    assert all(item in rec.item_ids for item in items)
