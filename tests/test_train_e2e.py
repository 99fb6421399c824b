"""A real short training run through the whole pipeline, and the command-line entry points."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.config import REPO_ROOT
from pipeline.runner import evaluate_checkpoint, train

SMALL = {
    "MAX_ITEM_LIST_LENGTH": 20,
    "hidden_size": 32,
    "d_state": 16,
    "head_dim": 16,
    "train_batch_size": 128,
    "eval_batch_size": 512,
    "show_progress": False,
}


@pytest.fixture(scope="module")
def trained(ml100k_slice, tmp_path_factory):
    overrides = {
        "dataset": "ml-slice",
        "data_path": str(ml100k_slice),
        "epochs": 3,
        "checkpoint_dir": str(tmp_path_factory.mktemp("saved")),
        **SMALL,
    }
    return train("TiM4Rec", [], overrides)


@pytest.mark.slow
def test_short_training_beats_a_random_ranker(trained):
    n_items = load_checkpoint(trained["checkpoint"])["identity"]["n_items"]
    test = trained["test"]
    assert all(math.isfinite(v) for v in test.values())
    random_hit10 = 10 / (n_items - 1)
    assert test["hit@10"] > 3 * random_hit10, test
    assert test["ndcg@10"] > 0


@pytest.mark.slow
def test_checkpoint_is_plain_data_and_reevaluates_identically(trained):
    payload = torch.load(trained["checkpoint"], weights_only=True)
    assert payload["identity"]["model"] == "TiM4Rec"
    assert isinstance(payload["config"], dict) and payload["config"]["hidden_size"] == 32
    again = evaluate_checkpoint(trained["checkpoint"], {"show_progress": False})
    assert again["test"] == pytest.approx(trained["test"], abs=1e-12)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_cli_rejects_a_malformed_override():
    result = run_cli("run.py", "--epochs")
    assert result.returncode == 2
    assert "overrides are written --key=value" in result.stderr


def test_cli_names_a_missing_dataset_and_the_fix(tmp_path):
    result = run_cli("run.py", "--dataset=no-such-set", f"--data_path={tmp_path}")
    assert result.returncode == 2
    assert "dataset 'no-such-set' not found" in result.stderr
    assert "python -m datatools prepare no-such-set" in result.stderr


def test_test_py_requires_a_checkpoint():
    result = run_cli("test.py")
    assert result.returncode == 2
    assert "--checkpoint" in result.stderr


def test_test_py_refuses_a_missing_checkpoint(tmp_path):
    result = run_cli("test.py", "--checkpoint", str(tmp_path / "none.pth"))
    assert result.returncode == 2
    assert "checkpoint not found" in result.stderr
