"""The eight baselines: one epoch each on a small real slice beats a random ranker, and
baseline/<Model>/run.py works from its own folder and from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_slice
from scipy.stats import binom

from pipeline.checkpoint import load_checkpoint
from pipeline.data import BUNDLED
from pipeline.registry import get_model_class
from pipeline.runner import train

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("SASRec", "BERT4Rec", "GRU4Rec", "Caser", "Mamba4Rec", "SSD4Rec", "TiSASRec", "LRURec")
# Small widths keep CI fast; the training protocol (CE, full ranking) is the real one.
SMALL = {
    "SASRec": {"hidden_size": 32, "inner_size": 128},
    "BERT4Rec": {"hidden_size": 32, "inner_size": 128, "train_batch_size": 32},  # learns slower
    "GRU4Rec": {"embedding_size": 32, "hidden_size": 32},
    "Caser": {"embedding_size": 32},
    "Mamba4Rec": {"hidden_size": 32, "d_state": 8},
    "SSD4Rec": {"hidden_size": 32, "d_state": 16, "head_dim": 16},
    "TiSASRec": {"hidden_size": 32},
    "LRURec": {"hidden_size": 32},
}
N_USERS = 100


@pytest.fixture(scope="module")
def small_slice(tmp_path_factory) -> Path:
    """data_path holding `ml-first100`: the first 100 users of the bundled ml-100k."""
    folder = tmp_path_factory.mktemp("baseline-data")
    return write_slice(folder, "ml-first100", BUNDLED["ml-100k"] / "ml-100k.inter", N_USERS)


def slice_overrides(data_path: Path, checkpoint_dir: Path) -> dict:
    return {
        "dataset": "ml-first100",
        "data_path": str(data_path),
        "checkpoint_dir": str(checkpoint_dir),
        "MAX_ITEM_LIST_LENGTH": 20,
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 256,
        "learning_rate": 0.003,
        "show_progress": False,
    }


def random_ranker_p_value(hits: int, trials: int, n_candidates: int, k: int = 50) -> float:
    """P(a random full ranking scores >= `hits` hits@k in `trials` users): binomial tail."""
    return float(binom.sf(hits - 1, trials, k / n_candidates))


@pytest.mark.slow
@pytest.mark.parametrize("model", BASELINES)
def test_baseline_trains_one_epoch_above_random(model, small_slice, tmp_path):
    overrides = {**slice_overrides(small_slice, tmp_path), **SMALL[model]}
    result = train(model, [REPO_ROOT / "baseline" / model / "config.yaml"], overrides)

    identity = load_checkpoint(result["checkpoint"])["identity"]
    n_items, n_users = identity["n_items"] - 1, identity["n_users"] - 1  # minus PAD
    assert 50 / n_items < 0.1  # enough items for hit@50 to mean something
    # Valid and test targets pooled: 2 * n_users independent trials of the random ranker.
    hits = round((result["valid"]["hit@50"] + result["test"]["hit@50"]) * n_users)
    p_value = random_ranker_p_value(hits, 2 * n_users, n_items)
    assert p_value < 1e-3, (model, result["valid"], result["test"], n_items, p_value)
    assert len(result["epoch_seconds"]) == 1
    assert result["n_params"] > 0


@pytest.mark.parametrize("model", BASELINES)
def test_run_py_names_its_model_and_config(model):
    run_py = REPO_ROOT / "baseline" / model / "run.py"
    assert f'main("{model}"' in run_py.read_text()
    assert (run_py.parent / "config.yaml").is_file()
    get_model_class(model)  # the name resolves


def _run(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # run.py must find the repository by itself
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("model", ["SASRec", "LRURec"])
def test_run_py_help_from_repository_root(model):
    done = _run([f"baseline/{model}/run.py", "--help"], cwd=REPO_ROOT, timeout=120)
    assert "usage: python run.py" in done.stdout + done.stderr


@pytest.mark.slow
def test_run_py_trains_from_its_own_folder(small_slice, tmp_path):
    folder = REPO_ROOT / "baseline" / "GRU4Rec"
    overrides = slice_overrides(small_slice, tmp_path / "saved")
    args = ["run.py", *(f"--{key}={value}" for key, value in overrides.items())]
    done = _run(args, cwd=folder, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 50 |" in done.stdout  # the test metrics table
    saved = list((tmp_path / "saved").glob("GRU4Rec-ml-first100-*.pth"))
    assert saved, done.stdout[-2000:]


def test_run_py_reports_a_bad_dataset(tmp_path):
    folder = REPO_ROOT / "baseline" / "SASRec"
    done = _run(
        ["run.py", "--dataset=no-such-data", f"--data_path={tmp_path}"], cwd=folder, timeout=120
    )
    assert done.returncode != 0
    assert "dataset 'no-such-data' not found" in done.stderr
