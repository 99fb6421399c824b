"""Training that survives SIGKILL and Ctrl-C, fails early on a bad disk, keeps concurrent
runs apart, and repeats itself on the GPU in deterministic mode."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN

from pipeline import runner
from pipeline.checkpoint import CheckpointError, load_checkpoint, temp_files
from pipeline.config import DEFAULT_RUN_CONFIG, REPO_ROOT, ConfigError, build_config
from pipeline.registry import get_model_class
from pipeline.runner import init_run_logger, main, train
from pipeline.trainer import configure_determinism

TINY = {**TINY_RUN, "stopping_step": 100}

# Runs run.py's main with torch.save slowed down: it writes half the file, says so, waits,
# then writes the rest, so that a kill can be aimed at the middle of a checkpoint write.
SLOW_SAVE_DRIVER = """
import io, sys, time
import torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("MID-SAVE", flush=True)
    time.sleep(1.0)
    f.write(data[len(data) // 2 :])
torch.save = slow_save
from pipeline.runner import main
sys.exit(main("TiM4Rec", sys.argv[1:]))
"""


# A tiny model gains nothing from threads, and on a shared CI runner several threads per
# process can make an epoch 50x slower. CPU sums may round differently with another thread
# count, so runs compared bit for bit use one thread on both sides.
ONE_THREAD_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def cli_args(ml_tiny: Path, folder: Path, epochs: int) -> list[str]:
    args = {**TINY, "data_path": ml_tiny, "checkpoint_dir": folder, "epochs": epochs}
    return [f"--{key}={value}" for key, value in args.items()]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def check_folder(folder: Path) -> dict[str, dict]:
    """Every *.pth loads; everything else is a leftover temp file. Returns the checkpoints."""
    loaded = {}
    for path in folder.iterdir():
        if path.suffix == ".pth":
            loaded[path.name] = load_checkpoint(path)  # raises on a torn file
        else:
            assert re.fullmatch(r"\..+\.pth\.\w+\.tmp", path.name), path.name
    return loaded


# --- SIGKILL ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_last_good_checkpoint(ml_tiny, tmp_path):
    folder = tmp_path / "saved"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    args = cli_args(ml_tiny, folder, epochs=100)  # never finishes on its own
    last_epoch = -1
    for kill in range(6):
        lasts = sorted(folder.glob("*-last.pth"))
        resume = [f"--checkpoint_path={lasts[0]}"] if lasts else []
        out = tmp_path / f"out{kill}.txt"
        with out.open("w") as stdout:
            proc = subprocess.Popen(
                [sys.executable, "-c", SLOW_SAVE_DRIVER, *args, *resume],
                cwd=REPO_ROOT,
                env=ONE_THREAD_ENV,
                stdout=stdout,
                stderr=subprocess.STDOUT,
            )
            try:
                if kill % 2 == 0:  # in the middle of a checkpoint write
                    # The 3rd or 4th save: at least one epoch's last checkpoint is whole.
                    nth = rng.randint(3, 4)
                    wait_for(
                        lambda n=nth, f=out: f.read_text().count("MID-SAVE") >= n, 300, "a save"
                    )
                    time.sleep(rng.uniform(0.0, 0.4))
                else:  # anywhere: start-up, an epoch, a save
                    time.sleep(rng.uniform(1.0, 6.0))
                assert proc.poll() is None, out.read_text()[-3000:]
                proc.kill()
            finally:
                proc.kill()
                proc.wait()
        saved = check_folder(folder)
        if kill % 2 == 0:
            assert list(folder.glob(".*.tmp")), f"kill {kill} missed the save (seed {seed})"
        lasts = [c for c in saved.values() if c["role"] == "last"]
        assert len(lasts) <= 1, f"seed {seed}"
        if lasts:
            assert lasts[0]["epoch"] >= last_epoch, f"progress lost (seed {seed})"
            last_epoch = lasts[0]["epoch"]
    assert last_epoch >= 2, f"each aimed kill lets one epoch finish (seed {seed})"

    # The survivor, resumed to the end, equals a run that was never killed.
    last = next(folder.glob("*-last.pth"))
    epochs = last_epoch + 2
    resumed = train("TiM4Rec", [], {**parse(args), "epochs": epochs, "checkpoint_path": str(last)})
    assert temp_files(resumed["checkpoint"]) == temp_files(resumed["last_checkpoint"]) == []
    reference = train(
        "TiM4Rec", [], {**parse(args), "epochs": epochs, "checkpoint_dir": str(tmp_path / "ref")}
    )
    history = load_checkpoint(resumed["last_checkpoint"])["history"]
    reference_history = load_checkpoint(reference["last_checkpoint"])["history"]
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in reference_history]
    assert resumed["test"] == reference["test"], f"seed {seed}"


def parse(args: list[str]) -> dict:
    return runner.parse_args(args).overrides


# --- Ctrl-C -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_prints_a_working_resume_command(ml_tiny, tmp_path):
    folder = tmp_path / "saved"
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "run.py", *cli_args(ml_tiny, folder, epochs=100)],
            cwd=REPO_ROOT,
            env=ONE_THREAD_ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            # as from a terminal: a test run started in the background (`pytest &` in a
            # script) passes SIGINT on as ignored, and this Ctrl-C would never arrive
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            wait_for(lambda: log.read_text().count("Saving last") >= 2, 300, "two epochs")
            proc.send_signal(signal.SIGINT)
            returncode = proc.wait(timeout=120)
        finally:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert returncode == 130, text[-3000:]
    assert "Traceback" not in text
    best = re.search(r"best checkpoint so far: (\S+)", text)
    command = re.search(r"^  (python run\.py .*--checkpoint_path=.*)$", text, re.MULTILINE)
    assert best and command, text[-3000:]
    argv = shlex.split(command.group(1))[2:]
    last_file = argv[-1].split("=", 1)[1]
    assert load_checkpoint(best.group(1))["role"] == "best"
    last_epoch = load_checkpoint(last_file)["epoch"]
    assert last_epoch >= 1

    # The printed command resumes the same run (one more epoch here).
    assert main("TiM4Rec", [*argv, f"--epochs={last_epoch + 2}"], DEFAULT_RUN_CONFIG) == 0
    resumed = load_checkpoint(last_file)
    assert resumed["epoch"] == last_epoch + 1
    assert [h["epoch"] for h in resumed["history"]] == list(range(last_epoch + 2))
    assert len(list(folder.glob("*.pth"))) == 2  # still the one run's best and last


# --- disk and files -----------------------------------------------------------------------


def test_an_unwritable_checkpoint_folder_fails_before_training(ml_tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot create a folder under a file
    with pytest.raises(ConfigError, match="cannot write checkpoints to .*a-file/saved"):
        train(
            "TiM4Rec",
            [],
            {
                **TINY,
                "data_path": str(ml_tiny),
                "epochs": 1,
                "checkpoint_dir": str(blocker / "saved"),
            },
        )


def test_a_full_disk_fails_before_training(ml_tiny, tmp_path, monkeypatch):
    usage = runner.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda path: usage._replace(free=100 * 1024))
    started = []
    monkeypatch.setattr("pipeline.trainer.ProjectTrainer.fit", lambda *a, **k: started.append(1))
    with pytest.raises(
        ConfigError, match=r"not enough disk space .*0\.1 MiB free, [\d.]+ MiB needed"
    ):
        train(
            "TiM4Rec",
            [],
            {
                **TINY,
                "data_path": str(ml_tiny),
                "epochs": 1,
                "checkpoint_dir": str(tmp_path / "saved"),
            },
        )
    assert started == []


def test_a_disk_that_fills_up_during_training_gives_a_clear_error(ml_tiny, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.checkpoint.torch.save", full)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*No space left"):
        train(
            "TiM4Rec",
            [],
            {**TINY, "data_path": str(ml_tiny), "epochs": 1, "checkpoint_dir": str(tmp_path)},
        )
    assert list(tmp_path.iterdir()) == []  # no half file, no temp file


def test_runs_started_in_the_same_second_get_their_own_log_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ under the working directory
    for where in ("pipeline.trainer", "recbole.utils.logger"):
        monkeypatch.setattr(f"{where}.get_local_time", lambda: "Jan-01-2030_00-00-00")
    config = build_config(get_model_class("TiM4Rec"), [], {**TINY, "data_path": str(tmp_path)})
    ids = []
    for _ in range(2):  # same config, same second
        init_run_logger(config)
        ids.append(config["run_id"])
    logs = sorted(p.name for p in (tmp_path / "log" / "TiM4Rec").iterdir())
    assert len(logs) == 2 and ids[0] != ids[1]
    assert all(any(run_id in name for name in logs) for run_id in ids)


# --- determinism --------------------------------------------------------------------------


@pytest.fixture
def restore_determinism():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    env = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "MAMBA_DETERMINISTIC")}
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_deterministic_mode_sets_torch_and_cublas(restore_determinism, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    configure_determinism({"deterministic": False, "ssd_backend": "auto", "ssd_kernel": "fused"})
    assert not torch.are_deterministic_algorithms_enabled()
    configure_determinism({"deterministic": True, "ssd_backend": "auto", "ssd_kernel": "fused"})
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.benchmark


@pytest.mark.gpu
def test_deterministic_mode_repeats_exactly_on_the_gpu(ml_tiny, tmp_path, restore_determinism):
    results = [
        train(
            "TiM4Rec",
            [],
            {
                **TINY,
                "data_path": str(ml_tiny),
                "epochs": 2,
                "deterministic": True,
                "checkpoint_dir": str(tmp_path / str(i)),
            },
        )
        for i in range(2)
    ]
    losses = [
        [h["train_loss"] for h in load_checkpoint(r["last_checkpoint"])["history"]] for r in results
    ]
    assert losses[0] == losses[1]
    assert results[0]["test"] == results[1]["test"]
