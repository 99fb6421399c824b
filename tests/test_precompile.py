"""Precompiling the Triton kernels before the first step (`triton_precompile`): the example
batches have the epoch's shapes, the dry pass changes nothing a run sees, and on the GPU
the real steps and evaluations then compile nothing."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from conftest import TINY_RUN
from recbole.data import create_dataset, data_preparation
from test_resume import assert_identical, outcome
from test_sequence_batches import L, small_config

import pipeline.precompile as precompile_module
from pipeline.precompile import example_batches, resized_samples, specialisation_sizes
from pipeline.runner import train
from pipeline.sequence_batches import CAUSAL_TIME, DeviceTrainLoader
from pipeline.trainer import ProjectTrainer, rng_state, set_rng_state
from tim4rec import POSITION_INDEX, TiM4Rec

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def loaders(data_path, **overrides):
    config = small_config(data_path, eval_batch_size=48, **CAUSAL_TIME, **overrides)
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    return config, dataset, train_data, valid_data


def test_resized_batches_cut_or_repeat_rows(ml100k_slice):
    _, _, train_data, _ = loaders(ml100k_slice)
    rows = next(iter(train_data))
    for n in (10, 64 * 2 + 5):
        resized = resized_samples(rows, n, "item_length", L)
        assert resized.interaction.keys() == rows.interaction.keys()
        for field, values in resized.interaction.items():
            assert torch.equal(values, rows[field][torch.arange(n) % 64]), field


@pytest.mark.parametrize("extra", [-2, +5, "double"])
def test_resized_all_positions_steps_keep_each_windows_targets(ml100k_slice, extra):
    config, _, train_data, _ = loaders(ml100k_slice)
    step = next(iter(DeviceTrainLoader(config, train_data, "all", CPU)))
    n = len(step["item_length"])
    rows = 2 * n + 5 if extra == "double" else n + extra
    resized = resized_samples(step, rows, "item_length", L)
    for field in ("user_id", "item_length", "item_id_list", "timestamp_list"):  # per window
        assert torch.equal(resized[field], step[field][torch.arange(rows) % n]), field
    original = {int(p): i for i, p in enumerate(step[POSITION_INDEX])}
    positions = resized[POSITION_INDEX]
    assert torch.all(positions[1:] > positions[:-1])  # ordered by window, each once
    windows = set()
    for j, p in enumerate(positions.tolist()):
        window, position = divmod(p, L)
        windows.add(window)
        i = original[(window % n) * L + position]  # the same target of the source window
        assert resized["item_id"][j] == step["item_id"][i]
        assert resized["timestamp"][j] == step["timestamp"][i]
    assert windows == set(range(rows))  # every window has its targets


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 30, 37, 600, 641])
def test_specialisation_sizes_cover_every_power_of_two_class(n):
    def twos(m: int) -> int:  # factors of 2 in m, counted up to 4 (divisible by 16)
        return min(4, (m & -m).bit_length() - 1)

    sizes = specialisation_sizes(n)
    assert sorted(twos(m) for m in sizes) == [0, 1, 2, 3, 4]
    assert all(1 <= m <= max(n, 16) for m in sizes)
    assert all(m >= n - 16 for m in sizes)  # near the step's own size


@pytest.mark.parametrize(
    "mode,overrides",
    [
        ("recbole rows", {}),
        ("all positions", {"train_positions": "all"}),
        ("padded all positions", {"train_positions": "all", "train_cuda_graph": True}),
    ],
)
def test_example_batches_have_the_shapes_an_epoch_meets(ml100k_slice, mode, overrides):
    config, _, recbole_train, valid_data = loaders(ml100k_slice, **overrides)
    train_data = recbole_train
    if overrides:
        train_data = DeviceTrainLoader(
            config, recbole_train, "all", CPU, pad_batches="train_cuda_graph" in overrides
        )
    streams = {"train": train_data, "valid": valid_data}
    state = rng_state(streams)
    train, evaluation = example_batches(config, train_data, valid_data, CPU)
    set_rng_state(state, streams)  # as ProjectTrainer.precompile_kernels does
    first = next(iter(train_data))
    if mode == "recbole rows":
        tail = len(recbole_train.dataset) % 64
        assert 0 < tail and [len(b["item_id"]) for b in train] == [64, tail]
    elif mode == "all positions":
        n = len(first["user_id"])
        expected = [n] + sorted(set(specialisation_sizes(n)) - {n}, reverse=True)
        assert [len(b["user_id"]) for b in train] == expected
    else:
        assert len(train) == 1
    assert torch.equal(train[0]["item_id"], first["item_id"])  # the epoch's own first step
    eval_tail = len(valid_data.dataset) % 48
    assert 0 < eval_tail and [len(b["item_id"]) for b in evaluation] == [48, eval_tail]


def test_the_dry_pass_changes_nothing_a_run_sees(ml_tiny, tmp_path, monkeypatch):
    """With the dry pass forced on the CPU (Triton's part replaced by nothing): the same
    losses, weights and metrics as without it; dropout draws random numbers inside it."""
    passes = []
    real_precompile = precompile_module.precompile

    def counted(*args, **kwargs):
        passes.append(1)
        return real_precompile(*args, **kwargs)

    def run(folder, precompile: bool):
        overrides = {**TINY_RUN, "epochs": 2, "dropout_prob": 0.3, "train_loader": "device"}
        overrides.update(
            data_path=str(ml_tiny), checkpoint_dir=str(folder), triton_precompile=precompile
        )
        return train("TiM4Rec", [], overrides)

    reference = run(tmp_path / "plain", precompile=False)
    monkeypatch.setattr(precompile_module, "triton_async_compile_available", lambda device: True)
    monkeypatch.setattr("pipeline.trainer.triton_async_compile_available", lambda device: True)
    monkeypatch.setattr(
        precompile_module, "compile_only", lambda workers: contextlib.nullcontext([])
    )
    monkeypatch.setattr("pipeline.trainer.precompile", counted)
    precompiled = run(tmp_path / "precompiled", precompile=True)
    assert passes == [1]
    assert_identical(outcome(precompiled), outcome(reference))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["last", "all", "graph"])
def test_after_precompiling_steps_and_evaluation_compile_nothing(ml100k_slice, mode):
    import triton

    # A state size per mode that no other test uses: each precompile has kernels to compile.
    d_state = {"last": 24, "all": 48, "graph": 40}[mode]
    overrides = {"d_state": d_state, "head_dim": 16, "use_gpu": True}
    if mode != "last":
        overrides["train_positions"] = "all"
    if mode == "graph":
        overrides["train_cuda_graph"] = True
    config, dataset, recbole_train, valid_data = loaders(ml100k_slice, **overrides)
    cuda = torch.device("cuda")
    train_data = recbole_train
    if mode != "last":
        train_data = DeviceTrainLoader(config, recbole_train, "all", cuda, mode == "graph")
    torch.manual_seed(0)
    model = TiM4Rec(config, train_data.dataset).to(cuda)
    trainer = ProjectTrainer(config, model, dataset)
    trainer._saving = False  # no checkpoint files
    compiling_threads = []  # the backward pass's kernels too: in the pool, none in autograd's
    triton.knobs.runtime.jit_post_compile_hook = lambda *args, **kwargs: compiling_threads.append(
        threading.current_thread().name
    )
    try:
        report = trainer.precompile_kernels(train_data, valid_data)
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
    assert report is not None and report.skipped is None
    assert set(compiling_threads) == {threading.main_thread().name}
    compiled = []

    def record(*args, **kwargs):
        compiled.append(kwargs.get("repr"))
        return False  # compile as usual

    triton.knobs.runtime.jit_cache_hook = record
    try:
        trainer._train_epoch(train_data, 0)
        trainer.evaluate(valid_data, load_best_model=False)
    finally:
        triton.knobs.runtime.jit_cache_hook = None
    print(f"\n[gpu] {mode}: {report}, then {compiled}")
    assert report.kernels > 0
    assert compiled == []


@pytest.mark.gpu
def test_training_with_precompiled_kernels_matches_training_without(ml_tiny, tmp_path):
    def run(folder, precompile: bool):
        overrides = {**TINY_RUN, "epochs": 2, "use_gpu": True, "deterministic": True}
        overrides.update(
            data_path=str(ml_tiny), checkpoint_dir=str(folder), triton_precompile=precompile
        )
        return outcome(train("TiM4Rec", [], overrides))

    plain, precompiled = run(tmp_path / "plain", False), run(tmp_path / "pre", True)
    torch.testing.assert_close(precompiled["losses"], plain["losses"], rtol=1e-5, atol=1e-6)
    for name, tensor in plain["best_state"].items():
        torch.testing.assert_close(precompiled["best_state"][name], tensor, msg=name)


def test_a_failing_dry_pass_is_reported_and_never_fatal(monkeypatch, caplog):
    @contextlib.contextmanager
    def broken(workers):
        raise TypeError("JITFunction.run() got an unexpected keyword argument")
        yield

    monkeypatch.setattr(precompile_module, "triton_async_compile_available", lambda device: True)
    monkeypatch.setattr(precompile_module, "compile_only", broken)
    model = torch.nn.Linear(3, 2)
    model.eval()
    report = precompile_module.precompile(model, lambda batch: model(batch).sum(), [torch.ones(3)])
    assert report.kernels == 0 and report.skipped.startswith("TypeError: JITFunction.run()")
    assert "kernels compile at first use" in caplog.text
    assert not model.training  # its mode restored
