"""RecBole's Trainer with this project's checkpoints (plain data, atomic, checked on load)."""

from __future__ import annotations

import os
import random
import uuid

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import get_local_time, set_color

from pipeline.checkpoint import CheckpointError, check_matches, load_checkpoint, save_checkpoint

# Keys that describe this machine or this invocation, not the experiment.
ENVIRONMENT_KEYS = {
    "data_path",
    "checkpoint_dir",
    "checkpoint_path",
    "device",
    "gpu_id",
    "use_gpu",
    "local_rank",
    "nproc",
    "world_size",
    "offset",
    "ip",
    "port",
    "config_files",
    "overrides",
}


def experiment_config(config) -> dict:
    """The run's own settings (our YAML layers + overrides) as a plain dict."""
    return {k: v for k, v in config.external_config_dict.items() if k not in ENVIRONMENT_KEYS}


def identity(config, dataset) -> dict:
    """What a checkpoint must share with a run to be loaded into it."""
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "n_users": int(dataset.user_num),
        "n_items": int(dataset.item_num),
    }


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> dict:
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_plain(state: dict) -> tuple:
    return (
        state["kind"],
        state["keys"].numpy().astype(np.uint32),
        state["pos"],
        state["has_gauss"],
        state["cached_gaussian"],
    )


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class ProjectTrainer(Trainer):
    """Saves the best model as `saved/<Model>-<dataset>-<time>-<id>.pth` (plain data)."""

    def __init__(self, config, model, dataset) -> None:
        super().__init__(config, model)
        self.identity = identity(config, dataset)
        self.experiment = experiment_config(config)
        self.item_tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
        run_id = f"{get_local_time()}-{uuid.uuid4().hex[:6]}"  # concurrent runs never collide
        name = f"{config['model']}-{config['dataset']}-{run_id}.pth"
        self.saved_model_file = os.path.join(self.checkpoint_dir, name)

    def checkpoint_payload(self, epoch: int) -> dict:
        return {
            "identity": self.identity,
            "config": self.experiment,
            "item_tokens": self.item_tokens,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": _plain_metrics(self.best_valid_result),
            "rng": rng_state(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint(path, self.checkpoint_payload(epoch))
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def load_model_state(self, path) -> dict:
        payload = load_checkpoint(path, map_location=self.device)
        check_matches(payload, self.identity, path)
        _check_shapes(self.model, payload["state_dict"], path)
        self.model.load_state_dict(payload["state_dict"])
        return payload

    def resume_checkpoint(self, resume_file):
        payload = self.load_model_state(resume_file)
        self.saved_model_file = str(resume_file)
        self.start_epoch = payload["epoch"] + 1
        self.cur_step = payload["cur_step"]
        self.best_valid_score = payload["best_valid_score"]
        self.best_valid_result = payload.get("best_valid_result")
        self.optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            path = model_file or self.saved_model_file
            self.load_model_state(path)
            self.logger.info(f"Loading model structure and parameters from {path}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


def _plain_metrics(result) -> dict | None:
    return None if result is None else {k: float(v) for k, v in result.items()}


def _check_shapes(model: torch.nn.Module, state_dict: dict, path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} was written by a different architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in own.items():
        if tensor.shape != state_dict[name].shape:
            raise CheckpointError(
                f"checkpoint {path} does not match this configuration: parameter {name} has "
                f"shape {tuple(state_dict[name].shape)} there, {tuple(tensor.shape)} here"
            )
