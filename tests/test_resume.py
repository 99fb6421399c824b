"""Exact resume and repeatability on CPU: an interrupted and resumed run equals an
uninterrupted one bit for bit, and the same seed gives the same run."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.runner import train
from pipeline.trainer import ProjectTrainer, TrainingInterrupted

EPOCHS = 4
INTERRUPT_AT = 2  # epochs 0 and 1 finish, epoch 2 is cut short
TINY = {**TINY_RUN, "stopping_step": 10}


pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(ml_tiny: Path, folder: Path, **extra) -> dict:
    return {
        **TINY,
        "data_path": str(ml_tiny),
        "checkpoint_dir": str(folder),
        "epochs": EPOCHS,
        **extra,
    }


def outcome(result: dict) -> dict:
    """Everything a run produced: losses per epoch, best weights, metrics."""
    last = load_checkpoint(result["last_checkpoint"])
    best = load_checkpoint(result["checkpoint"])
    return {
        "losses": [h["train_loss"] for h in last["history"]],
        "valid_scores": [h.get("valid_score") for h in last["history"]],
        "best_epoch": best["epoch"],
        "best_state": best["state_dict"],
        "valid": result["valid"],
        "test": result["test"],
        "best_valid_score": result["best_valid_score"],
    }


def assert_identical(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"]  # floats compared exactly
    assert a["valid_scores"] == b["valid_scores"]
    assert a["best_epoch"] == b["best_epoch"]
    assert a["best_state"].keys() == b["best_state"].keys()
    for name, tensor in a["best_state"].items():
        assert torch.equal(tensor, b["best_state"][name]), name
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    assert a["best_valid_score"] == b["best_valid_score"]


@pytest.fixture(scope="module")
def reference(ml_tiny, tmp_path_factory) -> dict:
    result = train("TiM4Rec", [], overrides(ml_tiny, tmp_path_factory.mktemp("reference")))
    return {"result": result, **outcome(result)}


@pytest.fixture(scope="module")
def interrupted(ml_tiny, tmp_path_factory) -> TrainingInterrupted:
    """A run stopped by Ctrl-C in the middle of epoch INTERRUPT_AT; tests resume copies."""
    original = ProjectTrainer._train_epoch

    def train_epoch(self, train_data, epoch_idx, **kwargs):
        if epoch_idx == INTERRUPT_AT:
            # Half an epoch has drawn from every random stream before the Ctrl-C.
            random.random(), np.random.rand(), torch.rand(3), iter(train_data)
            raise KeyboardInterrupt
        return original(self, train_data, epoch_idx, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(ProjectTrainer, "_train_epoch", train_epoch)
    try:
        with pytest.raises(TrainingInterrupted) as stop:
            train("TiM4Rec", [], overrides(ml_tiny, tmp_path_factory.mktemp("interrupted")))
    finally:
        patch.undo()
    return stop.value


def copy_run(stop: TrainingInterrupted, folder: Path) -> tuple[Path, Path]:
    """(best, last) copied into `folder`, so that each test resumes the same state."""
    return tuple(Path(shutil.copy(name, folder)) for name in (stop.best_file, stop.last_file))


def test_same_seed_gives_identical_runs(ml_tiny, tmp_path, reference):
    again = train("TiM4Rec", [], overrides(ml_tiny, tmp_path))
    assert_identical(outcome(again), reference)


def test_an_interrupted_run_resumes_bit_for_bit(ml_tiny, interrupted, reference, tmp_path):
    assert interrupted.last_epoch == INTERRUPT_AT - 1
    best, last = copy_run(interrupted, tmp_path)
    assert load_checkpoint(last)["epoch"] == INTERRUPT_AT - 1

    resumed = train(
        "TiM4Rec", [], overrides(ml_tiny, tmp_path / "unused", checkpoint_path=str(last))
    )

    assert_identical(outcome(resumed), reference)
    # The resumed run kept writing to its own two files, next to the one it resumed.
    assert (resumed["checkpoint"], resumed["last_checkpoint"]) == (str(best), str(last))
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == sorted([best.name, last.name])
    assert load_checkpoint(last)["epoch"] == EPOCHS - 1


def test_resuming_never_replaces_a_better_best(ml_tiny, interrupted, tmp_path):
    # The interrupted run with an unbeatable stored best (NDCG@10 of 1.0 is the maximum):
    # no resumed epoch may overwrite the best checkpoint.
    best, last = copy_run(interrupted, tmp_path)
    for path in (best, last):
        state = load_checkpoint(path)
        state["best_valid_score"] = 1.0
        save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    best_bytes = hashlib.sha256(best.read_bytes()).hexdigest()

    resumed = train("TiM4Rec", [], overrides(ml_tiny, tmp_path, checkpoint_path=str(last)))

    assert resumed["best_valid_score"] == 1.0
    assert hashlib.sha256(best.read_bytes()).hexdigest() == best_bytes
    assert load_checkpoint(last)["epoch"] == EPOCHS - 1  # training did go on


def test_resuming_a_finished_run_trains_nothing_and_reports_the_same(ml_tiny, reference):
    last = Path(reference["result"]["last_checkpoint"])
    stamp = last.stat().st_mtime_ns
    again = train("TiM4Rec", [], overrides(ml_tiny, last.parent, checkpoint_path=str(last)))
    assert again["test"] == reference["test"] and again["valid"] == reference["valid"]
    assert last.stat().st_mtime_ns == stamp  # nothing was trained, nothing rewritten
