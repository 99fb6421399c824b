"""RecBole's Trainer with this project's checkpoints: plain data, atomic, checked on load,
and resumable bit for bit.

A run named `<Model>-<dataset>-<time>-<id>` writes two files into its checkpoint folder:

- `<run>.pth`, the best model (RecBole's rule: written when the valid metric improves);
  evaluation and test.py read this one.
- `<run>-last.pth`, the state at the end of the latest finished epoch, written every
  epoch (every validated epoch when eval_step > 1).

Both hold the complete training state: model, optimizer, epoch, best score and result,
early-stopping counter, loss history and every random state (Python, numpy, torch CPU and
CUDA, the train and valid dataloaders' generators). `checkpoint_path=<either file>`
resumes; the resumed run keeps writing to the same two files. docs/checkpoints.md has the
user-facing rules.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import uuid
from logging import getLogger
from pathlib import Path
from time import time

import numpy as np
import torch
import yaml
from recbole.trainer import Trainer
from recbole.utils import get_gpu_usage, get_local_time, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from pipeline.checkpoint import (
    CheckpointError,
    check_matches,
    load_checkpoint,
    remove_temp_files,
    save_checkpoint,
)
from pipeline.config import model_defaults
from pipeline.cuda_graphs import GraphedTrainingLoss
from pipeline.optimizer import load_state_keeping_kernel, with_fused_kernel
from pipeline.precision import autocast
from pipeline.precompile import (
    PrecompileReport,
    example_batches,
    precompile,
    triton_async_compile_available,
)

LAST_SUFFIX = "-last"
NAN_CHECK_STEPS = 50  # training steps between the host syncs of the NaN check
RECBOLE_MODEL_CONFIG_DIR = (
    Path(importlib.util.find_spec("recbole").origin).parent / "properties" / "model"
)

# Keys that describe this machine or this invocation, not the experiment.
# data_path stays: test.py looks for the data where training found it (--data_path overrides).
ENVIRONMENT_KEYS = {
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
    "run_id",
}
# Keys besides the model's own defaults that change what a trained model computes.
MODEL_EXTRA_KEYS = ("MAX_ITEM_LIST_LENGTH", "loss_type")
# Settings a resumed run may change without a warning: they do not alter the trajectory.
RESUME_FREE_KEYS = {
    "epochs",
    "stopping_step",
    "show_progress",
    "eval_batch_size",
    "data_path",
    "deterministic",
    "state",
    "triton_precompile",
}


def new_run_id() -> str:
    """`<time>-<6 hex>`: names a run's log and checkpoints; concurrent runs never collide."""
    return f"{get_local_time()}-{uuid.uuid4().hex[:6]}"


def experiment_config(config) -> dict:
    """The run's own settings (our YAML layers + overrides) as a plain dict."""
    return {
        k: _plain_value(v)
        for k, v in config.external_config_dict.items()
        if k not in ENVIRONMENT_KEYS
    }


def _plain_value(value):
    """YAML-like data only: `weights_only` loading refuses other objects (a Path, say)."""
    if isinstance(value, dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def identity(config, dataset) -> dict:
    """What a checkpoint must share with a run to be loaded into it."""
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "n_users": int(dataset.user_num),
        "n_items": int(dataset.item_num),
    }


def model_config(config, model_class: type) -> dict:
    """The settings that define the trained model: every key of its defaults files (ours in
    config/model/, RecBole's for its models) and MAX_ITEM_LIST_LENGTH, loss_type.

    `*_backend` keys choose kernels, not the model, and may differ (CPU vs GPU).
    """
    files = list(model_defaults(model_class))
    files += [RECBOLE_MODEL_CONFIG_DIR / f"{cls.__name__}.yaml" for cls in model_class.__mro__]
    keys = set(MODEL_EXTRA_KEYS)
    for path in files:
        if path.is_file():
            keys |= set(yaml.safe_load(path.read_text()) or {})
    return {
        key: _plain_value(config[key])
        for key in sorted(keys)
        if key in config and not key.endswith("_backend")
    }


def configure_determinism(config) -> None:
    """`deterministic: True`: bit-identical repeats on the GPU too, at some cost in speed.

    CPU runs with the same seed are identical anyway. On CUDA this switches PyTorch to its
    deterministic kernels (warning, not failing, on ops that have none), fixes the cuBLAS
    workspace, turns off cuDNN autotuning, and asks mamba-ssm for its deterministic SSD
    backward where the installed version has one; older versions accumulate some gradients
    with atomic adds, so use `ssd_backend: torch` there for exact GPU repeats (the default
    fused SSD kernel, `ssd_kernel: fused`, has no atomics).
    """
    if not config["deterministic"]:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    os.environ.setdefault("MAMBA_DETERMINISTIC", "1")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    uses_mamba_scan = config["ssd_backend"] not in (None, "torch") and (
        config["ssd_kernel"] == "mamba"
    )
    if torch.cuda.is_available() and uses_mamba_scan and not mamba_has_deterministic_mode():
        getLogger().warning(
            "deterministic: True, but the installed mamba-ssm's Triton SSD backward uses "
            "atomic adds, so GPU runs may still differ in the last bits; set "
            "--ssd_backend=torch for bit-identical GPU runs (slower)"
        )


def mamba_has_deterministic_mode() -> bool:
    """Whether mamba-ssm has `utils/determinism.py` (its atomic-free backward), without
    importing the package (its __init__ needs the compiled Mamba-1 extension)."""
    try:
        spec = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        (Path(folder) / "utils" / "determinism.py").is_file()
        for folder in spec.submodule_search_locations
    )


# --- random states ----------------------------------------------------------------------


def rng_state(loaders: dict) -> dict:
    """Every random state a training epoch draws from, as plain data."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        # Each RecBole dataloader shuffles (and seeds its iterator) from its own generator.
        "loaders": {
            name: loader.generator.get_state()
            for name, loader in loaders.items()
            if getattr(loader, "generator", None) is not None
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loaders: dict) -> None:
    # map_location may have put the byte tensors on the GPU; RNG states live on the CPU.
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for name, loader_state in state.get("loaders", {}).items():
        loader = loaders.get(name)
        if loader is not None and getattr(loader, "generator", None) is not None:
            loader.generator.set_state(loader_state.cpu())


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
        state["keys"].cpu().numpy().astype(np.uint32),
        state["pos"],
        state["has_gauss"],
        state["cached_gaussian"],
    )


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- the trainer ------------------------------------------------------------------------


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; says which checkpoints are on disk and where to resume."""

    def __init__(self, best_file: str | None, last_file: str | None, last_epoch: int | None):
        super().__init__("training interrupted")
        self.best_file = best_file
        self.last_file = last_file
        self.last_epoch = last_epoch


class SyncFreeTrainer(Trainer):
    """RecBole's Trainer whose training epoch does not wait for the GPU at every step.

    The base of ProjectTrainer and of the data-parallel loop (pipeline/distributed.py),
    below both in the method order, as RecBole's own `_train_epoch` was.
    """

    def _build_optimizer(self, **kwargs):
        """RecBole's optimizer; Adam and AdamW with CUDA parameters run torch's fused kernel
        when `fused_optimizer` is on (pipeline/optimizer.py)."""
        optimizer = super()._build_optimizer(**kwargs)
        return with_fused_kernel(optimizer) if self.config["fused_optimizer"] else optimizer

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """RecBole's training epoch (the same steps, the same returned sum of batch losses)
        without its two host syncs per step: RecBole reads each loss (`.item()`) and checks
        it for NaN before the backward pass, so the GPU waits while the host queues every
        backward. Here the losses are summed on the device and checked for NaN every
        NAN_CHECK_STEPS steps and at the end of the epoch."""
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        steps = (
            tqdm(train_data, total=len(train_data), ncols=100,
                 desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress
            else train_data
        )  # fmt: skip
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.enable_scaler)
        total = losses = None
        for step, interaction in enumerate(steps, start=1):
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad()
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                losses = loss_func(interaction)
            parts = losses if isinstance(losses, tuple) else (losses,)
            values = torch.stack([part.detach().double() for part in parts])
            total = values if total is None else total + values
            if step % NAN_CHECK_STEPS == 0:
                self._check_nan(total.sum())
            scaler.scale(sum(parts) + sync_loss).backward()
            if self.clip_grad_norm:
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
            if self.gpu_available and show_progress:
                steps.set_postfix_str(set_color("GPU RAM: " + get_gpu_usage(self.device), "yellow"))
        if total is None:
            return None
        self._check_nan(total.sum())
        sums = total.tolist()
        return tuple(sums) if isinstance(losses, tuple) else sums[0]


class ProjectTrainer(SyncFreeTrainer):
    """RecBole's Trainer writing `<run>.pth` (best) and `<run>-last.pth` (every epoch)."""

    def __init__(self, config, model, dataset) -> None:
        configure_determinism(config)  # before anything runs on the GPU
        super().__init__(config, model)
        self.identity = identity(config, dataset)
        self.model_config = model_config(config, type(model))
        self.experiment = experiment_config(config)
        self.item_tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
        run_id = config["run_id"] or new_run_id()  # runner sets it; the log carries it too
        self._use_run_name(
            Path(self.checkpoint_dir), f"{config['model']}-{config['dataset']}-{run_id}"
        )
        self.history: list[dict] = []  # one entry per finished epoch: loss, time, valid score
        self.stopped_early = False
        self.last_epoch: int | None = None  # the epoch the last checkpoint holds
        self._saving = True
        self._has_valid = False
        self._loaders: dict = {}
        self._pending_rng: dict | None = None  # restored when fit() has the dataloaders
        self._latest_valid_result = None
        self.graphed_loss = (
            GraphedTrainingLoss(model, config["precision"] or "fp32")
            if config["train_cuda_graph"]
            else None
        )

    def _use_run_name(self, folder: Path, run_name: str) -> None:
        self.run_name = run_name
        self.saved_model_file = str(folder / f"{run_name}.pth")
        self.last_model_file = str(folder / f"{run_name}{LAST_SUFFIX}.pth")

    def disk_bytes_needed(self) -> int:
        """Room for the best and the last checkpoint and one being written, with a margin."""
        model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        checkpoint = 3 * model_bytes  # weights + Adam's two moments
        return 3 * checkpoint + (1 << 20)

    # --- writing ---

    def checkpoint_payload(self, epoch: int, role: str) -> dict:
        best_result = self.best_valid_result
        if role == "best" and self._latest_valid_result is not None:
            # RecBole saves the best model before it records this epoch's result as the best.
            best_result = self._latest_valid_result
        return {
            "role": role,
            "run_name": self.run_name,
            "identity": self.identity,
            "model_config": self.model_config,
            "config": self.experiment,
            "item_tokens": self.item_tokens,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": _plain_metrics(best_result),
            "stopped_early": self.stopped_early,
            "history": self.history,
            "rng": rng_state(self._loaders),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):  # RecBole's hook: the best model
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint(path, self.checkpoint_payload(epoch, role="best"))
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def _save_last(self, epoch: int) -> None:
        if not self._saving or (not self.config["single_spec"] and self.config["local_rank"] != 0):
            return
        save_checkpoint(self.last_model_file, self.checkpoint_payload(epoch, role="last"))
        self.last_epoch = epoch
        self.logger.info(set_color("Saving last", "blue") + f": {self.last_model_file}")

    # --- training: RecBole's fit, with the last checkpoint written after every epoch ---

    def fit(
        self,
        train_data,
        valid_data=None,
        verbose=True,
        saved=True,
        show_progress=False,
        callback_fn=None,
    ):
        self._loaders = {"train": train_data, "valid": valid_data}
        self._has_valid = bool(valid_data)
        self._saving = saved
        if self._pending_rng is not None:  # resuming: continue every random stream
            set_rng_state(self._pending_rng, self._loaders)
            self._pending_rng = None
        if self.stopped_early or self.start_epoch >= self.epochs:
            self.eval_collector.data_collect(train_data)  # as RecBole's fit does
            self.logger.info(
                f"nothing left to train (stopped early: {self.stopped_early}, next epoch "
                f"{self.start_epoch}, epochs {self.epochs}); raise --epochs to continue"
            )
            return self.best_valid_score, self.best_valid_result

        self.precompile_kernels(train_data, valid_data)

        def end_of_validated_epoch(epoch_idx, valid_score):
            # Called after RecBole updated best score, best result and early-stopping counter.
            self.stopped_early = self.cur_step > self.stopping_step  # RecBole's stop rule
            self._save_last(epoch_idx)
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        return super().fit(
            train_data,
            valid_data,
            verbose=verbose,
            saved=saved,
            show_progress=show_progress,
            callback_fn=end_of_validated_epoch,
        )

    def precompile_kernels(
        self, train_data, valid_data=None, loss_func=None
    ) -> PrecompileReport | None:
        """With `triton_precompile` on a CUDA device: compiles in parallel, before the first
        step, the Triton kernels that training steps (`loss_func`, default the configured
        precision's eager loss) and evaluations launch (pipeline/precompile.py). Draws no
        random number the run would see."""
        if not self.config["triton_precompile"] or not triton_async_compile_available(self.device):
            return None
        loaders = {"train": train_data, "valid": valid_data}
        state = rng_state(loaders)
        try:
            train, evaluation = example_batches(self.config, train_data, valid_data, self.device)
        finally:
            set_rng_state(state, loaders)
        return precompile(self.model, loss_func or self.eager_loss, train, evaluation)

    def precision_autocast(self) -> contextlib.AbstractContextManager:
        """The autocast of `precision` (pipeline/precision.py) around a training step's loss."""
        return autocast(self.device.type, self.config["precision"] or "fp32")

    def training_loss(self, interaction):
        """One training step's loss: the model's, in the configured precision (replayed from
        a CUDA graph with `train_cuda_graph`)."""
        if self.graphed_loss is not None:
            return self.graphed_loss(interaction)
        return self.eager_loss(interaction)

    def eager_loss(self, interaction):
        with self.precision_autocast():
            return self.model.calculate_loss(interaction)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        start = time()
        loss = super()._train_epoch(
            train_data,
            epoch_idx,
            loss_func=loss_func or self.training_loss,
            show_progress=show_progress,
        )
        self.history.append(
            {"epoch": epoch_idx, "train_loss": _plain_loss(loss), "train_seconds": time() - start}
        )
        if not self._validates(epoch_idx):  # validated epochs are saved after validation
            self._save_last(epoch_idx)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        valid_score, valid_result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self._latest_valid_result = valid_result
        if self.history:
            self.history[-1]["valid_score"] = float(valid_score)
        return valid_score, valid_result

    def _validates(self, epoch_idx: int) -> bool:
        return self.eval_step > 0 and self._has_valid and (epoch_idx + 1) % self.eval_step == 0

    def interrupted(self) -> TrainingInterrupted:
        """What a Ctrl-C leaves: the best checkpoint and the last finished epoch's state."""
        best = self.saved_model_file if Path(self.saved_model_file).is_file() else None
        last = self.last_model_file if Path(self.last_model_file).is_file() else None
        message = "training interrupted (Ctrl-C)"
        if last is not None:
            message += f"; the end of epoch {self.last_epoch} is saved in {last}"
        self.logger.warning(message)
        return TrainingInterrupted(best, last, self.last_epoch)

    # --- loading ---

    def load_model_state(self, path) -> dict:
        """Load a checkpoint's weights after checking it belongs to this model and data."""
        payload = load_checkpoint(path, map_location=self.device)
        check_matches(payload, self.identity, path, "identity")
        check_matches(payload, self.model_config, path, "model_config")
        _check_item_tokens(payload.get("item_tokens"), self.item_tokens, path)
        _check_shapes(self.model, payload["state_dict"], path)
        self.model.load_state_dict(payload["state_dict"])
        return payload

    def resume_checkpoint(self, resume_file):
        """Continue the run saved in `resume_file` (its -last.pth, or its best .pth)."""
        path = Path(resume_file)
        payload = self.load_model_state(path)
        self._warn_changed_settings(payload["config"], path)
        self._use_run_name(path.parent, payload["run_name"])
        for leftover in remove_temp_files(self.saved_model_file) + remove_temp_files(
            self.last_model_file
        ):
            self.logger.info(f"removed the leftover of an interrupted save: {leftover}")
        best_score = payload["best_valid_score"]
        if np.isfinite(best_score) and not Path(self.saved_model_file).is_file():
            raise CheckpointError(
                f"cannot resume from {path}: its best checkpoint {self.saved_model_file} is "
                "missing (the final evaluation reads it); put it back next to the file"
            )
        if payload["role"] == "best" and Path(self.last_model_file).is_file():
            self.logger.warning(
                f"resuming from the best checkpoint (epoch {payload['epoch']}); training "
                f"restarts after it and overwrites {self.last_model_file}"
            )
        self.start_epoch = payload["epoch"] + 1
        self.last_epoch = payload["epoch"]
        self.cur_step = payload["cur_step"]
        self.best_valid_score = best_score
        self.best_valid_result = payload["best_valid_result"]
        self.history = list(payload["history"])
        self.train_loss_dict = {h["epoch"]: h["train_loss"] for h in self.history}
        # A run stopped early continues only if its patience was raised.
        self.stopped_early = payload["stopped_early"] and self.cur_step > self.stopping_step
        load_state_keeping_kernel(self.optimizer, payload["optimizer"])
        self._pending_rng = payload["rng"]
        self.logger.info(
            f"Checkpoint {path} loaded. Resume training from epoch {self.start_epoch}; "
            f"writing to {self.saved_model_file} and {self.last_model_file}"
        )

    def _warn_changed_settings(self, stored: dict, path) -> None:
        keys = sorted((set(stored) | set(self.experiment)) - RESUME_FREE_KEYS)
        changed = [k for k in keys if stored.get(k) != self.experiment.get(k)]
        if changed:
            details = ", ".join(
                f"{k}: {stored.get(k)!r} -> {self.experiment.get(k)!r}" for k in changed
            )
            self.logger.warning(
                f"resuming {path} with changed settings ({details}); the result will not "
                "equal an uninterrupted run"
            )

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            path = model_file or self.saved_model_file
            self.load_model_state(path)
            self.logger.info(f"Loading model structure and parameters from {path}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


def _plain_metrics(result) -> dict | None:
    return None if result is None else {k: float(v) for k, v in result.items()}


def _plain_loss(loss) -> float | list[float]:
    return [float(x) for x in loss] if isinstance(loss, tuple) else float(loss)


def _check_item_tokens(stored: list | None, own: list[str], path) -> None:
    if stored is None or list(stored) == own:
        return
    index = next((i for i, (a, b) in enumerate(zip(stored, own)) if a != b), None)
    if index is None:
        detail = f"{len(stored)} items in the checkpoint, {len(own)} here"
    else:
        detail = f"item {index} is {stored[index]!r} in the checkpoint but {own[index]!r} here"
    raise CheckpointError(
        f"checkpoint {path} does not match this run: item_tokens differ ({detail}); the "
        "dataset was filtered or prepared differently"
    )


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
