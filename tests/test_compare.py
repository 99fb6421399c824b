"""compare.py: command line checks, the table, the results folder, and one real tiny run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import write_slice

import compare
from pipeline.data import BUNDLED


def _row(model: str, ndcg10: float, epochs: list[float], gpu: int | None = None) -> dict:
    test = {f"{m}@{k}": 0.1 for m in ("hit", "ndcg", "mrr") for k in (10, 20, 50)}
    test["ndcg@10"] = ndcg10
    message = {
        "test": test,
        "valid": test,
        "epoch_seconds": epochs,
        "n_params": 1234,
        "device": "cuda" if gpu else "cpu",
        "peak_gpu_bytes": gpu,
        "peak_rss_bytes": 300 * compare.MIB,
    }
    return compare.summarize(model, [], message)


def test_select_models_puts_tim4rec_first_and_refuses_unknown_names():
    assert compare.select_models("SASRec, Caser,SASRec") == ["TiM4Rec", "SASRec", "Caser"]
    assert compare.select_models("LRURec,TiM4Rec") == ["TiM4Rec", "LRURec"]
    with pytest.raises(compare.CompareError, match="unknown model.*SASrec.*choose from"):
        compare.select_models("SASrec")


def test_parse_command_passes_overrides_to_every_model(tmp_path):
    config = tmp_path / "extra.yaml"
    config.write_text("learning_rate: 0.01\n")
    args, files, overrides = compare.parse_command(
        ["--dataset=ml-100k", "--models", "GRU4Rec", "--epochs", "3", "--train_batch_size=512"]
        + ["--config", str(config)]
    )
    assert args.models == ["TiM4Rec", "GRU4Rec"]
    assert overrides == {"train_batch_size": 512, "dataset": "ml-100k", "epochs": 3}
    assert files == [config.resolve()]
    assert compare.model_config_files("GRU4Rec", files)[0].name == "config.yaml"
    assert compare.model_config_files("TiM4Rec", files) == files  # its config/model defaults
    paper = [Path("config/config4beauty_64d.yaml")]
    assert compare.model_config_files("TiM4Rec", files, paper) == paper + files
    assert compare.model_config_files("SSD4Rec", files, paper)[1:] == paper + files
    assert paper[0] not in compare.model_config_files("SASRec", files, paper)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "Nope"], "unknown model(s) Nope"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--gpus", "0,x"], "--gpus takes distinct GPU ids"),
        (["--gpus", "1,1"], "--gpus takes distinct GPU ids"),
        (["--tim4rec-config", "nope.yaml"], "--tim4rec-config file not found"),
        (["--model-timeout", "0"], "--model-timeout must be > 0"),
        (["--dataset", "no-such-data", "--data_path=/nonexistent"], "'no-such-data' not found"),
    ],
)
def test_bad_command_fails_before_training_and_writes_nothing(argv, message, tmp_path, capsys):
    assert compare.main([*argv, "--out", str(tmp_path / "results")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_gpus_run_models_in_parallel_one_per_gpu_in_order(monkeypatch):
    import threading

    running: dict[str, str] = {}
    lock = threading.Lock()
    seen = []

    def fake_run_model(model, files, overrides, threads, gpu, timeout=None):
        with lock:
            assert gpu not in running.values(), "two models on one GPU"
            running[model] = gpu
            seen.append((model, gpu))
        time.sleep(0.05)
        with lock:
            del running[model]
        return {**_row(model, 0.1, [1.0, 1.0]), "wall_seconds": 0.05}

    monkeypatch.setattr(compare, "run_model", fake_run_model)
    models = ["TiM4Rec", "SASRec", "GRU4Rec", "Caser", "LRURec"]
    rows = compare.run_all(models, [], {}, None, ["0", "1"])
    assert [r["model"] for r in rows] == models
    assert {gpu for _, gpu in seen} == {"0", "1"}
    sequential = compare.run_all(models[:2], [], {}, None, [])
    assert [r["model"] for r in sequential] == models[:2]


def test_seconds_per_epoch_skip_the_first_epoch_and_memory_kind():
    row = _row("SASRec", 0.2, [9.0, 2.0, 4.0])
    assert row["seconds_per_epoch"] == 3.0
    assert row["seconds_per_epoch_from"] == "second epoch on"
    assert (row["peak_memory_kind"], row["peak_memory_bytes"]) == ("RSS", 300 * compare.MIB)
    single = _row("GRU4Rec", 0.1, [5.0], gpu=2 * compare.MIB)
    assert (
        single["seconds_per_epoch"] == 5.0
        and single["seconds_per_epoch_from"] == "first epoch only"
    )
    assert (single["peak_memory_kind"], single["peak_memory_bytes"]) == ("GPU", 2 * compare.MIB)


def test_markdown_table_marks_best_and_failures():
    rows = [
        _row("TiM4Rec", 0.3, [3.0, 1.0]),
        _row("SASRec", 0.2, [2.0]),
        {"model": "Caser", "error": "out of memory\ndetails"},
    ]
    text = compare.markdown_table(rows, {"dataset": "toy", "notes": {"device": "cpu"}})
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Model"))
    assert "Hit@10 | NDCG@10 | MRR@10" in header and header.endswith("Peak MiB |")
    tim4rec = next(line for line in lines if line.startswith("| TiM4Rec"))
    assert "**0.3000**" in tim4rec and "| 1.0 | 2 | 300 (RSS) |" in tim4rec
    assert "| 2.0* | 1 |" in next(line for line in lines if line.startswith("| SASRec"))
    assert "| Caser | failed: out of memory |" in text


def test_write_results_is_complete_or_absent(tmp_path):
    rows = [_row("TiM4Rec", 0.3, [3.0, 1.0]), _row("SASRec", 0.2, [2.0, 2.5])]
    report = {"dataset": "toy", "notes": {"device": "cpu"}, "models": rows}
    folder = compare.write_results(tmp_path, "toy", report, rows)
    assert folder.name.startswith("toy-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "comparison.json",
        "comparison.md",
        "comparison.png",
    ]
    assert (folder / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / "comparison.json").read_text())["models"][1]["model"] == "SASRec"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folder left


@pytest.mark.slow
def test_compare_runs_tim4rec_and_a_baseline(tmp_path):
    data = write_slice(tmp_path / "data", "ml-first60", BUNDLED["ml-100k"] / "ml-100k.inter", 60)
    argv = [
        "--dataset=ml-first60",
        "--models=GRU4Rec",
        "--epochs=2",
        "--threads=1",
        f"--out={tmp_path / 'results'}",
        f"--data_path={data}",
        f"--checkpoint_dir={tmp_path / 'saved'}",
        "--MAX_ITEM_LIST_LENGTH=20",
        "--hidden_size=32",
        "--show_progress=False",
    ]
    assert compare.main(argv) == 0
    (folder,) = Path(tmp_path / "results").iterdir()
    report = json.loads((folder / "comparison.json").read_text())
    assert [row["model"] for row in report["models"]] == ["TiM4Rec", "GRU4Rec"]
    for row in report["models"]:
        assert len(row["epoch_seconds"]) == 2
        assert row["seconds_per_epoch"] == pytest.approx(row["epoch_seconds"][1])
        assert row["n_params"] > 0 and row["peak_memory_bytes"] > 0
        assert 0 <= row["test"]["ndcg@10"] <= 1
    table = (folder / "comparison.md").read_text()
    assert "| TiM4Rec |" in table and "| GRU4Rec |" in table


def test_model_timeout_stops_training_and_tests_the_best_checkpoint_so_far(tmp_path):
    data = write_slice(tmp_path / "data", "ml-first60", BUNDLED["ml-100k"] / "ml-100k.inter", 60)
    overrides = {
        "dataset": "ml-first60",
        "data_path": str(data),
        "checkpoint_dir": str(tmp_path / "saved"),
        "MAX_ITEM_LIST_LENGTH": 20,
        "show_progress": False,
        "epochs": 100000,  # only the time limit ends this run
        "stopping_step": 100000,
    }
    files = compare.model_config_files("GRU4Rec", [])
    started = time.time()
    message = compare.run_model("GRU4Rec", files, overrides, threads=1, timeout=15)
    assert time.time() - started < 120
    assert "error" not in message, message.get("error")
    assert message["stopped_at_deadline"] is True
    assert len(message["epoch_seconds"]) >= 1 and 0 <= message["test"]["ndcg@10"] <= 1
    row = compare.summarize("GRU4Rec", files, message)
    assert "stopped by --model-timeout" in compare.row_summary(row)
    assert "†" in compare.markdown_table([row], {"dataset": "ml-first60", "notes": {}})


def test_ctrl_c_is_restored_in_a_process_that_inherited_it_ignored():
    """Background jobs of scripts start with SIGINT ignored; timeouts rely on SIGINT."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal\n"
        "from pipeline.runner import restore_ctrl_c\n"
        "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "restore_ctrl_c()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    signal.pause() if hasattr(signal, 'pause') else None\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(compare.__file__).resolve().parent,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "interrupted" in done.stdout, done.stderr[-2000:]
