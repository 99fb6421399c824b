"""The one pipeline behind run.py, test.py and baseline/<Model>/run.py."""

from __future__ import annotations

import os
import sys
import time
from logging import getLogger
from pathlib import Path

from recbole.utils import init_logger, init_seed

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.config import REPO_ROOT, ConfigError, build_config, parse_args
from pipeline.data import DatasetError, load_data
from pipeline.registry import get_model_class
from pipeline.trainer import ProjectTrainer
from pipeline.validate import validate_config

USER_ERRORS = (ConfigError, DatasetError, CheckpointError)
METRICS_ORDER = ("hit", "ndcg", "mrr")


def prepare_run(model_name: str, config_files: list[Path], overrides: dict):
    """Config, logger, seed, data and model: everything a run needs before training."""
    os.chdir(REPO_ROOT)  # log/, log_tensorboard/ and saved/ live at the repository root
    model_class = get_model_class(model_name)
    config = build_config(model_class, config_files, overrides)
    validate_config(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    ensure_writable(config["checkpoint_dir"])
    dataset, train_data, valid_data, test_data = load_data(config)
    logger.info(dataset)
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
    trainer = ProjectTrainer(config, model, dataset)
    if config["checkpoint_path"]:
        trainer.resume_checkpoint(config["checkpoint_path"])
    start = time.time()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=True, show_progress=config["show_progress"]
    )
    train_seconds = time.time() - start
    test_result = trainer.evaluate(
        test_data, load_best_model=True, show_progress=config["show_progress"]
    )
    logger.info(f"best valid: {dict(best_valid_result or {})}")
    logger.info("test result:\n" + metrics_table(test_result))
    logger.info(f"checkpoint: {trainer.saved_model_file}")
    return {
        "model": model_name,
        "dataset": config["dataset"],
        "checkpoint": trainer.saved_model_file,
        "best_valid_score": float(best_valid_score),
        "valid": {k: float(v) for k, v in (best_valid_result or {}).items()},
        "test": {k: float(v) for k, v in test_result.items()},
        "train_seconds": train_seconds,
    }


def evaluate_checkpoint(checkpoint: Path, overrides: dict) -> dict:
    """Rebuild the run stored in `checkpoint` and evaluate it on the test split."""
    payload = load_checkpoint(checkpoint)
    model_name = payload["identity"]["model"]
    stored = dict(payload["config"])
    stored.update(overrides)
    config, dataset, (_, _, test_data), model = prepare_run(model_name, [], stored)
    trainer = ProjectTrainer(config, model, dataset)
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
    }


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


def ensure_writable(folder: str | os.PathLike) -> None:
    """Fail before training, not after it, when checkpoints cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write checkpoints to {folder}: {err.strerror}") from None


def main(model_name: str, argv: list[str] | None = None, default_config: Path | None = None) -> int:
    """Command-line entry for training: `python run.py [--config F] [--key=value]`."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        files = args.config_files or ([default_config] if default_config else [])
        result = train(model_name, files, args.overrides)
    except USER_ERRORS as err:
        return _fail(err)
    print(metrics_table(result["test"]))
    print(f"best checkpoint: {result['checkpoint']}")
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
    print(metrics_table(result["test"]))
    return 0


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2
