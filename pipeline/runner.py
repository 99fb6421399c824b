"""The one pipeline behind run.py, test.py and baseline/<Model>/run.py."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import time
from logging import getLogger
from pathlib import Path

import recbole.utils.logger as recbole_logger
from recbole.utils import init_logger, init_seed

from pipeline import distributed
from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.config import REPO_ROOT, ConfigError, build_config, parse_args
from pipeline.data import DatasetError, load_data
from pipeline.host_memory import keep_freed_memory
from pipeline.registry import get_model_class
from pipeline.sequence_batches import make_train_loader
from pipeline.trainer import TrainingInterrupted, new_run_id
from pipeline.validate import validate_config

USER_ERRORS = (ConfigError, DatasetError, CheckpointError)
METRICS_ORDER = ("hit", "ndcg", "mrr")


def prepare_run(model_name: str, config_files: list[Path], overrides: dict, training: bool = True):
    """Config, logger, seed, data and model: everything a run needs before training
    (`training=False`: RecBole's train loader as it is, for evaluation only)."""
    os.chdir(REPO_ROOT)  # log/, log_tensorboard/ and saved/ live at the repository root
    model_class = get_model_class(model_name)
    overrides = distributed.init_from_env(overrides)  # torchrun: join the process group
    config = build_config(model_class, config_files, overrides)
    distributed.adapt_config(config)
    validate_config(config)
    init_seed(config["seed"], config["reproducibility"])
    init_run_logger(config)
    logger = getLogger()
    logger.info(config)
    if config["keep_host_memory"] and keep_freed_memory():
        logger.info("host memory: freed blocks kept for reuse (keep_host_memory)")
    ensure_writable(config["checkpoint_dir"])
    dataset, train_data, valid_data, test_data = load_data(config)
    logger.info(dataset)
    if training:
        train_data = make_train_loader(config, train_data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = model_class(config, train_data.dataset).to(config["device"])
    logger.info(model)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Trainable parameters: {n_params:,}")
    return config, dataset, (train_data, valid_data, test_data), model


def train(model_name: str, config_files: list[Path], overrides: dict) -> dict:
    """Train `model_name`, keep the best checkpoint, evaluate it on the test split."""
    config, dataset, (train_data, valid_data, test_data), model = prepare_run(
        model_name, config_files, overrides
    )
    logger = getLogger()
    trainer = distributed.make_trainer(config, model, dataset)
    if config["checkpoint_path"]:
        trainer.resume_checkpoint(config["checkpoint_path"])
    # A full disk fails here, not when the first checkpoint is written.
    ensure_writable(Path(trainer.saved_model_file).parent, trainer.disk_bytes_needed())
    start = time.time()
    try:
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=True, show_progress=config["show_progress"]
        )
        train_seconds = time.time() - start
        test_result = trainer.evaluate(
            test_data, load_best_model=True, show_progress=config["show_progress"]
        )
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints on disk are whole (atomic writes)
        raise trainer.interrupted() from None
    logger.info(f"best valid: {dict(best_valid_result or {})}")
    logger.info("test result:\n" + metrics_table(test_result))
    logger.info(f"checkpoint: {trainer.saved_model_file}")
    return {
        "model": model_name,
        "dataset": config["dataset"],
        "checkpoint": trainer.saved_model_file,
        "last_checkpoint": trainer.last_model_file,
        "best_valid_score": float(best_valid_score),
        "valid": {k: float(v) for k, v in (best_valid_result or {}).items()},
        "test": {k: float(v) for k, v in test_result.items()},
        "train_seconds": train_seconds,
        "epoch_seconds": [h["train_seconds"] for h in trainer.history],  # compare.py
        "valid_curve": [h.get("valid_score") for h in trainer.history],  # valid_metric per epoch
        "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": str(config["device"]),
    }


def evaluate_checkpoint(checkpoint: Path, overrides: dict) -> dict:
    """Rebuild the run stored in `checkpoint` and evaluate it on the test split."""
    payload = load_checkpoint(checkpoint)
    model_name = payload["identity"]["model"]
    stored = dict(payload["config"])
    stored.update(overrides)
    config, dataset, (_, _, test_data), model = prepare_run(model_name, [], stored, training=False)
    trainer = distributed.make_trainer(config, model, dataset)
    result = trainer.evaluate(
        test_data,
        load_best_model=True,
        model_file=str(checkpoint),
        show_progress=config["show_progress"],
    )
    getLogger().info("test result:\n" + metrics_table(result))
    return {
        "model": model_name,
        "dataset": config["dataset"],
        "checkpoint": str(checkpoint),
        "test": {k: float(v) for k, v in result.items()},
        "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": str(config["device"]),
    }


def restore_ctrl_c() -> None:
    """Make SIGINT raise KeyboardInterrupt again in this process.

    A process started in the background by a non-interactive shell (`cmd &` in a script,
    nohup) inherits SIGINT as ignored, and Python then installs no handler: the SIGINT
    that compare.py's --model-timeout and reproduce.py's --deadline send would do nothing.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_stopped_run(stop: TrainingInterrupted) -> dict | None:
    """A run stopped early (Ctrl-C, a time limit): test its best checkpoint so far.

    Returns `evaluate_checkpoint`'s result plus the epochs' history, marked
    `stopped_at_deadline`; None when no epoch finished (nothing to test).
    """
    if not stop.best_file:
        return None
    result = evaluate_checkpoint(Path(stop.best_file), {"show_progress": False})
    history = load_checkpoint(stop.last_file)["history"] if stop.last_file else []
    result["epoch_seconds"] = [h["train_seconds"] for h in history]
    result["valid_curve"] = [h.get("valid_score") for h in history]
    result["stopped_at_deadline"] = True
    return result


def metrics_table(result: dict) -> str:
    """A Markdown table, one row per cutoff: | @k | Hit | NDCG | MRR |."""
    cutoffs = sorted({int(k.split("@")[1]) for k in result if "@" in k})
    names = [m for m in METRICS_ORDER if any(k.startswith(m + "@") for k in result)]
    lines = ["| @k | " + " | ".join(n.upper() if n != "hit" else "Hit" for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for k in cutoffs:
        values = [f"{float(result[f'{n}@{k}']):.4f}" for n in names]
        lines.append(f"| {k} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def ensure_writable(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """Fail before training, not after it, when checkpoints cannot be written or will not fit."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write checkpoints to {folder}: {err.strerror or err}; "
            "set --checkpoint_dir=<a writable folder>"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ConfigError(
            f"not enough disk space for checkpoints in {folder}: {free / 2**20:.1f} MiB free, "
            f"{need_bytes / 2**20:.1f} MiB needed (best + last checkpoint + one being written); "
            "free some space or set --checkpoint_dir=<a folder on another disk>"
        )


def init_run_logger(config) -> None:
    """RecBole's logger, with a file name unique to this run.

    RecBole names the log `<Model>-<dataset>-<time>-<md5 of config>.log`: two runs of one
    config started in the same second would share it. We put the run id (time + random
    suffix, also in the checkpoint names) where RecBole puts the time; the tensorboard
    folder takes the same name.
    """
    config["run_id"] = new_run_id()
    local_time = recbole_logger.get_local_time
    recbole_logger.get_local_time = lambda: config["run_id"]
    try:
        init_logger(config)
    finally:
        recbole_logger.get_local_time = local_time


def resume_command(argv: list[str], checkpoint: str) -> str:
    """The command line that continues an interrupted `python <script> <argv>` run."""
    kept = [a for a in argv if not a.startswith("--checkpoint_path=")]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "run.py"
    return shlex.join(["python", script, *kept, f"--checkpoint_path={checkpoint}"])


def main(model_name: str, argv: list[str] | None = None, default_config: Path | None = None) -> int:
    """Command-line entry for training: `python run.py [--config F] [--key=value]`."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        files = args.config_files or ([default_config] if default_config else [])
        result = train(model_name, files, args.overrides)
    except USER_ERRORS as err:
        return _fail(err)
    except TrainingInterrupted as stop:
        print(interrupted_message(stop, argv), file=sys.stderr)
        return 130  # the shell's code for "ended by SIGINT"
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return 130
    if distributed.is_main_process():
        print(metrics_table(result["test"]))
        print(f"best checkpoint: {result['checkpoint']}")
    distributed.finish()
    return 0


def test_main(argv: list[str] | None = None) -> int:
    """Command-line entry for evaluation: `python test.py --checkpoint F [--key=value]`."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv, allow_checkpoint=True)
        if args.checkpoint is None:
            raise ConfigError("test.py needs --checkpoint saved/<file>.pth")
        result = evaluate_checkpoint(args.checkpoint, args.overrides)
    except USER_ERRORS as err:
        return _fail(err)
    if distributed.is_main_process():
        print(metrics_table(result["test"]))
    distributed.finish()
    return 0


def interrupted_message(stop: TrainingInterrupted, argv: list[str]) -> str:
    lines = ["training interrupted."]
    if stop.best_file:
        lines.append(f"best checkpoint so far: {stop.best_file}")
    if stop.last_file:
        lines.append(f"to resume after epoch {stop.last_epoch}:")
        lines.append("  " + resume_command(argv, stop.last_file))
    else:
        lines.append("no epoch finished, so there is nothing to resume; start the run again")
    return "\n".join(lines)


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2
