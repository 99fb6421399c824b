"""The device-side training loader and all-positions training: the batches hold RecBole's
training samples exactly, every position's loss equals its prefix sample's for causal
models, the causal time path ignores later positions, and wrong settings fail clearly."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction
from test_resume import assert_identical, outcome

from models.layers import LowerTriangularLinear, PrefixLayerNorm
from pipeline.config import ConfigError, build_config
from pipeline.runner import evaluate_checkpoint, train
from pipeline.sequence_batches import (
    CAUSAL_TIME,
    WINDOW_MULTIPLE,
    DeviceTrainLoader,
    SequenceStore,
    SequenceStoreError,
    make_train_loader,
)
from pipeline.trainer import ProjectTrainer, TrainingInterrupted
from pipeline.validate import validate_config
from ssd import TiSSDBlock
from tim4rec import POSITION_INDEX, SSD4Rec, TiM4Rec

L = 8
pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(data_path, model_class=TiM4Rec, **overrides):
    """A one-second model on the ml-100k slice, no dropout unless overridden."""
    return build_config(
        model_class,
        [],
        {
            "dataset": "ml-slice",
            "data_path": str(data_path),
            "MAX_ITEM_LIST_LENGTH": L,
            "train_batch_size": 64,
            "hidden_size": 16,
            "d_state": 8,
            "head_dim": 8,
            "chunk_size": 4,
            "dropout_prob": 0.0,
            "time_drop_out": 0.0,
            **overrides,
        },
    )


def loaded(data_path, model_class=TiM4Rec, **overrides):
    config = small_config(data_path, model_class, **overrides)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    return config, dataset, train_data


def sample_key(inter, row: int):
    """(user, history items, history times, target item, target time) of one sample."""
    n = int(inter["item_length"][row])
    return (
        int(inter["user_id"][row]),
        tuple(inter["item_id_list"][row, :n].tolist()),
        tuple(inter["timestamp_list"][row, :n].tolist()),
        int(inter["item_id"][row]),
        float(inter["timestamp"][row]),
    )


def recbole_samples(train_data) -> list:
    inter = train_data.dataset.inter_feat
    return sorted(sample_key(inter, i) for i in range(len(inter)))


def expand_windows(batch: Interaction) -> Interaction:
    """An all-positions batch as the per-prefix samples it stands for (RecBole's layout)."""
    flat = batch[POSITION_INDEX]
    window, position = flat // L, flat % L
    later = torch.arange(L)[None, :] > position[:, None]
    return Interaction(
        {
            "user_id": batch["user_id"][window],
            "item_id_list": batch["item_id_list"][window].masked_fill(later, 0),
            "timestamp_list": batch["timestamp_list"][window].masked_fill(later, 0),
            "item_length": position + 1,
            "item_id": batch["item_id"],
            "timestamp": batch["timestamp"],
        }
    )


def test_device_loader_yields_each_recbole_sample_once(ml100k_slice):
    config, _, train_data = loaded(ml100k_slice, train_loader="device")
    loader = DeviceTrainLoader(config, train_data, "last", torch.device("cpu"))
    got = []
    for batch in loader:
        assert len(batch["item_id"]) <= 64
        got += [sample_key(batch, i) for i in range(len(batch["item_id"]))]
    assert sorted(got) == recbole_samples(train_data)
    assert len(loader) == len(train_data)


def test_all_positions_windows_hold_each_sample_once(ml100k_slice):
    config, _, train_data = loaded(ml100k_slice, **CAUSAL_TIME)
    loader = DeviceTrainLoader(config, train_data, "all", torch.device("cpu"))
    got, targets_per_step = [], []
    for batch in loader:
        samples = expand_windows(batch)
        targets_per_step.append(len(samples["item_id"]))
        got += [sample_key(samples, i) for i in range(len(samples["item_id"]))]
    assert sorted(got) == recbole_samples(train_data)
    # Users longer than L need one window per sample past the L-th: fewer windows than
    # samples, more than users.
    windows = len(loader.window_targets)
    assert train_data.dataset.user_num - 1 < windows < len(got)
    # Steps are cut by targets: about train_batch_size each (a window adds at most L).
    assert all(n <= 64 + L for n in targets_per_step[:-1])
    assert sum(targets_per_step) == len(got)


def test_the_epoch_order_changes_and_repeats_from_the_generator_state(ml100k_slice):
    config, _, train_data = loaded(ml100k_slice, **CAUSAL_TIME)
    loader = DeviceTrainLoader(config, train_data, "all", torch.device("cpu"))
    state = loader.generator.get_state()
    first = [b["item_id"] for b in loader]
    second = [b["item_id"] for b in loader]
    loader.generator.set_state(state)
    again = [b["item_id"] for b in loader]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("model_class,overrides", [(TiM4Rec, CAUSAL_TIME), (SSD4Rec, {})])
def test_all_positions_loss_equals_the_per_prefix_loss(ml100k_slice, model_class, overrides):
    config, _, train_data = loaded(ml100k_slice, model_class, **overrides)
    torch.manual_seed(0)
    model = model_class(config, train_data.dataset).eval()
    loader = DeviceTrainLoader(config, train_data, "all", torch.device("cpu"))
    for batch, _ in zip(loader, range(3)):
        with torch.no_grad():
            windows = model.calculate_loss(batch)
            prefixes = model.calculate_loss(expand_windows(batch))
        torch.testing.assert_close(windows, prefixes, rtol=1e-5, atol=1e-6)


def test_the_causal_time_block_ignores_later_positions():
    torch.manual_seed(0)
    block = TiSSDBlock(
        d_model=16, max_seq_length=12, d_state=8, head_dim=8, chunk_size=4,
        p2p_residual=True, causal_time=True, backend="torch",
    ).eval()  # fmt: skip
    u, T = torch.randn(3, 12, 16), torch.randn(3, block.nheads, 12)
    u2, T2 = u.clone(), T.clone()
    u2[:, 7:] += torch.randn(3, 5, 16)
    T2[..., 7:] += torch.randn(3, block.nheads, 5)
    with torch.no_grad():
        out, t_next = block(u, T)
        out2, t_next2 = block(u2, T2)
    torch.testing.assert_close(out[:, :7], out2[:, :7])
    torch.testing.assert_close(t_next[..., :7], t_next2[..., :7])
    assert not torch.allclose(out[:, 7:], out2[:, 7:])


def test_causal_layers_against_explicit_loops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    linear = LowerTriangularLinear(9).double()
    norm = PrefixLayerNorm(9).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
        expected_linear = torch.stack(
            [x[..., : i + 1] @ linear.weight[i, : i + 1] + linear.bias[i] for i in range(9)], -1
        )
        expected_norm = torch.stack(
            [
                (x[..., i] - x[..., : i + 1].mean(-1))
                / torch.sqrt(x[..., : i + 1].var(-1, unbiased=False) + norm.eps)
                * norm.weight[i]
                + norm.bias[i]
                for i in range(9)
            ],
            -1,
        )
        torch.testing.assert_close(linear(x), expected_linear)
        torch.testing.assert_close(norm(x), expected_norm)


def test_a_store_refuses_samples_that_are_not_prefixes(ml100k_slice):
    _, _, train_data = loaded(ml100k_slice)
    dataset = train_data.dataset.copy(train_data.dataset.inter_feat)
    rows = torch.randperm(len(dataset.inter_feat), generator=torch.Generator().manual_seed(0))
    dataset.inter_feat = dataset.inter_feat[rows]
    with pytest.raises(SequenceStoreError):
        SequenceStore(dataset, L)
    dataset.inter_feat = train_data.dataset.inter_feat[torch.arange(len(rows))]  # a copy
    dataset.inter_feat["item_id_list"][5, 0] += 1
    with pytest.raises(SequenceStoreError, match="'item_id' histories differ"):
        SequenceStore(dataset, L)


def test_make_train_loader_turns_a_store_error_into_a_config_error(ml100k_slice, monkeypatch):
    config, _, train_data = loaded(ml100k_slice, train_loader="device")

    def refuse(self, dataset, max_length):
        raise SequenceStoreError("a user's training samples are not consecutive")

    monkeypatch.setattr(SequenceStore, "__init__", refuse)
    with pytest.raises(ConfigError, match="Use train_loader: recbole"):
        make_train_loader(config, train_data)


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model.calculate_loss(batch)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("positions", ["all", "last"])
def test_padded_batches_have_fixed_shapes_and_the_same_loss_and_gradients(ml100k_slice, positions):
    """pad_batches (for CUDA graphs): few shapes, and padding rows change nothing."""
    config, _, train_data = loaded(ml100k_slice, TiM4Rec, **CAUSAL_TIME)
    torch.manual_seed(0)
    model = TiM4Rec(config, train_data.dataset)
    plain = DeviceTrainLoader(config, train_data, positions, torch.device("cpu"))
    padded = DeviceTrainLoader(config, train_data, positions, torch.device("cpu"), pad_batches=True)
    shapes = set()
    for batch, padded_batch in zip(plain, padded):  # same generator seed: the same steps
        shapes.add(tuple((k, tuple(v.shape)) for k, v in sorted(padded_batch.interaction.items())))
        if positions == "all":
            assert len(padded_batch["item_id_list"]) % WINDOW_MULTIPLE == 0
            assert len(padded_batch[POSITION_INDEX]) == 64 + L - 1  # batch size + L - 1
        else:
            assert len(padded_batch["item_id"]) == 64
        loss, grads = loss_and_grads(model, batch)
        padded_loss, padded_grads = loss_and_grads(model, padded_batch)
        torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=1e-7)
        assert padded_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(padded_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert len(shapes) == 1  # the ml-100k slice: under 128 windows per step, every step alike


@pytest.mark.parametrize(
    "model,overrides,message",
    [
        ("TiM4Rec", {"train_cuda_graph": True}, "needs batches of fixed shapes"),
        ("SASRec", {"train_cuda_graph": True}, "train_cuda_graph is implemented for TiM4Rec"),
        ("TiM4Rec", {"train_cuda_graph": "yes"}, "train_cuda_graph must be bool"),
        ("TiM4Rec", {"train_positions": "all"}, "needs a causal model.*time_encoding: paper"),
        ("TiM4Rec", {"time_encoding": "causal"}, "causal needs p2p_residual: True"),
        ("SASRec", {"train_positions": "all"}, "implemented for TiM4Rec and SSD4Rec, not SASRec"),
        ("TiM4Rec", {"train_positions": "every"}, "train_positions must be one of last, all"),
        ("TiM4Rec", {"train_loader": "gpu"}, "train_loader must be one of recbole, device"),
        ("TiM4Rec", {"precision": "fp16"}, "precision must be one of fp32, bf16"),
        ("BERT4Rec", {"train_loader": "device"}, "transform: mask_itemseq"),
        (
            "SASRec",
            {
                "train_loader": "device",
                "loss_type": "BPR",
                "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
            },
            "draws no negative samples",
        ),
    ],
)
def test_wrong_training_modes_are_refused(model, overrides, message):
    from pipeline.registry import get_model_class

    config = build_config(get_model_class(model), [], {"dataset": "ml-100k", **overrides})
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


ALL_POSITIONS = {**TINY_RUN, **CAUSAL_TIME, "train_positions": "all", "epochs": 3}


def test_all_positions_training_learns_and_resumes_bit_for_bit(ml_tiny, tmp_path, monkeypatch):
    def run(folder, **extra):
        overrides = {**ALL_POSITIONS, "data_path": str(ml_tiny), "checkpoint_dir": str(folder)}
        return train("TiM4Rec", [], {**overrides, **extra})

    reference = run(tmp_path / "reference")
    assert reference["test"]["ndcg@10"] > 0
    # test.py's path rebuilds the model from the checkpoint and scores the same.
    tested = evaluate_checkpoint(Path(reference["checkpoint"]), {"show_progress": False})
    assert tested["test"] == reference["test"]

    original = ProjectTrainer._train_epoch

    def stop_in_epoch_1(self, train_data, epoch_idx, **kwargs):
        if epoch_idx == 1:
            random.random(), np.random.rand(), torch.rand(3), list(train_data)
            raise KeyboardInterrupt
        return original(self, train_data, epoch_idx, **kwargs)

    monkeypatch.setattr(ProjectTrainer, "_train_epoch", stop_in_epoch_1)
    with pytest.raises(TrainingInterrupted) as stop:
        run(tmp_path / "stopped")
    monkeypatch.undo()
    shutil.copy(stop.value.best_file, tmp_path)
    last = shutil.copy(stop.value.last_file, tmp_path)
    resumed = run(tmp_path / "unused", checkpoint_path=str(last))
    assert_identical(outcome(resumed), outcome(reference))


@pytest.mark.parametrize("precision,autocast", [("bf16", torch.bfloat16), ("fp32", None)])
def test_training_losses_run_in_the_configured_precision(
    ml_tiny, tmp_path, monkeypatch, precision, autocast
):
    seen = set()
    calculate_loss = TiM4Rec.calculate_loss

    def recording(self, interaction):
        enabled = torch.is_autocast_enabled("cpu")
        seen.add(torch.get_autocast_dtype("cpu") if enabled else None)
        return calculate_loss(self, interaction)

    monkeypatch.setattr(TiM4Rec, "calculate_loss", recording)
    result = train(
        "TiM4Rec",
        [],
        {**TINY_RUN, "epochs": 1, "precision": precision, "train_loader": "device",
         "data_path": str(ml_tiny), "checkpoint_dir": str(tmp_path)},
    )  # fmt: skip
    assert seen == {autocast}
    assert np.isfinite(result["test"]["ndcg@10"])


@pytest.mark.gpu
@pytest.mark.parametrize("model_class,overrides", [(TiM4Rec, CAUSAL_TIME), (SSD4Rec, {})])
def test_on_cuda_batches_are_recbole_samples_and_all_positions_loss_matches(
    ml100k_slice, model_class, overrides
):
    """The loader on the GPU, and the causal model on the Triton kernels (TF32 tolerance)."""
    cuda = torch.device("cuda")
    config, _, train_data = loaded(ml100k_slice, model_class, **overrides, train_loader="device")
    loader = DeviceTrainLoader(config, train_data, "last", cuda)
    got = [sample_key(b.to("cpu"), i) for b in loader for i in range(len(b["item_id"]))]
    assert sorted(got) == recbole_samples(train_data)
    torch.manual_seed(0)
    model = model_class(config, train_data.dataset).to(cuda).eval()
    windows = DeviceTrainLoader(config, train_data, "all", cuda)
    for batch, _ in zip(windows, range(3)):
        assert batch["item_id_list"].device.type == "cuda"
        with torch.no_grad():
            loss = model.calculate_loss(batch)
            prefix_loss = model.calculate_loss(expand_windows(batch.to("cpu")).to(cuda))
        torch.testing.assert_close(loss, prefix_loss, rtol=2e-3, atol=2e-3)


def test_cuda_graphs_need_one_cuda_process(monkeypatch):
    overrides = {"dataset": "ml-100k", "train_cuda_graph": True, "train_loader": "device"}
    config = build_config(TiM4Rec, [], {**overrides, "use_gpu": False})
    with pytest.raises(ConfigError, match="train_cuda_graph needs a CUDA device"):
        validate_config(config)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="runs on one process only"):
        validate_config(config)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_graphed_training_steps_match_eager_ones(ml100k_slice, positions, precision):
    """Forward and backward replayed from CUDA graphs: the eager step's loss and gradients
    (no dropout), over several steps of different shapes, with optimizer steps between."""
    from pipeline.cuda_graphs import GraphedTrainingLoss

    cuda = torch.device("cuda")
    config, _, train_data = loaded(ml100k_slice, TiM4Rec, **CAUSAL_TIME, train_batch_size=32)
    torch.manual_seed(0)
    graphed_model = TiM4Rec(config, train_data.dataset).to(cuda).train()
    eager_model = TiM4Rec(config, train_data.dataset).to(cuda).train()
    eager_model.load_state_dict(graphed_model.state_dict())
    graphed = GraphedTrainingLoss(graphed_model, precision)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (graphed_model, eager_model)]
    loader = DeviceTrainLoader(config, train_data, positions, cuda, pad_batches=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    tolerance = dict(rtol=2e-2, atol=2e-3) if precision == "bf16" else dict(rtol=1e-4, atol=1e-5)
    for step, batch in zip(range(6), loader):
        losses, grads = [], []
        for model, optimizer, loss_of in (
            (graphed_model, optimizers[0], graphed),
            (eager_model, optimizers[1], None),
        ):
            optimizer.zero_grad()
            if loss_of is None:
                with autocast:
                    loss = model.calculate_loss(batch)
            else:
                loss = loss_of(batch)
            loss.backward()
            losses.append(loss.detach().float())
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
            optimizer.step()
        torch.testing.assert_close(losses[0], losses[1], **tolerance)
        for name, grad in grads[1].items():
            torch.testing.assert_close(grads[0][name], grad, **tolerance, msg=f"step {step} {name}")
    assert 1 <= len(graphed.graphs) <= 3
    print(f"\n[gpu] {positions} {precision}: {len(graphed.graphs)} graph(s), losses match")


class _LinearLoss(torch.nn.Module):
    """Two linear layers and a cross-entropy: a loss that runs on cuBLAS."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(32, 128)
        self.out = torch.nn.Linear(128, 500)

    def calculate_loss(self, interaction: Interaction) -> torch.Tensor:
        logits = self.out(torch.relu(self.hidden(interaction["x"])))
        return torch.nn.functional.cross_entropy(logits, interaction["y"])


@pytest.mark.gpu
def test_graphed_loss_leaves_one_stream_of_cublas_workspaces():
    """Capturing four batch shapes leaves at most one stream's cuBLAS workspaces allocated
    once training ends (a forward and a backward thread, cuBLAS and cuBLASLt), not one set
    per shape as make_graphed_callables' fresh warm-up streams did (325 MiB on an H100)."""
    import gc

    from pipeline.cuda_graphs import GraphedTrainingLoss

    cuda = torch.device("cuda")

    def batch(rows: int) -> Interaction:
        x = torch.randn(rows, 32, device=cuda)
        return Interaction({"x": x, "y": torch.randint(0, 500, (rows,), device=cuda)})

    _LinearLoss().to(cuda).calculate_loss(batch(8)).backward()  # default-stream workspaces
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(cuda)
    model = _LinearLoss().to(cuda)
    graphed = GraphedTrainingLoss(model)
    for rows in (64, 128, 192, 256):
        for _ in range(2):
            model.zero_grad()
            graphed(batch(rows)).backward()
    assert len(graphed.graphs) == 4
    del model, graphed
    gc.collect()
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated(cuda) - before
    # newer torch reports the workspace size (2.14 does); on Hopper 2.11 uses 32 MiB
    workspace = getattr(torch._C, "_cuda_getCublasWorkspaceSize", lambda: 32 * 2**20)()
    one_stream = 4 * workspace
    print(f"\n[gpu] left after training: {left / 2**20:.1f} MiB (bound {one_stream / 2**20:.0f})")
    assert left <= one_stream


@pytest.mark.gpu
def test_training_with_cuda_graphs_learns(ml_tiny, tmp_path):
    result = train(
        "TiM4Rec",
        [],
        {**ALL_POSITIONS, "data_path": str(ml_tiny), "checkpoint_dir": str(tmp_path),
         "train_cuda_graph": True, "use_gpu": True},
    )  # fmt: skip
    history = torch.load(result["last_checkpoint"], weights_only=True)["history"]
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert 0 <= result["test"]["ndcg@10"] <= 1  # 20 test users: too few to expect a hit


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec", "Caser", "Mamba4Rec", "TiSASRec", "LRURec"])
def test_baselines_train_on_device_batches(ml100k_slice, model):
    """Every model reads what it needs from the device loader's batches (BERT4Rec, whose
    masking is RecBole's batch transform, is refused above)."""
    from pipeline.registry import get_model_class

    model_class = get_model_class(model)
    config = build_config(
        model_class,
        [],
        {"dataset": "ml-slice", "data_path": str(ml100k_slice), "MAX_ITEM_LIST_LENGTH": L,
         "train_batch_size": 64, "hidden_size": 16, "train_loader": "device"},
    )  # fmt: skip
    validate_config(config)
    train_data = make_train_loader(config, data_preparation(config, create_dataset(config))[0])
    assert isinstance(train_data, DeviceTrainLoader)
    torch.manual_seed(0)
    loss = model_class(config, train_data.dataset).calculate_loss(next(iter(train_data)))
    loss.backward()
    assert torch.isfinite(loss)
