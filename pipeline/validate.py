"""Checks on a merged configuration, so that a bad key fails at start with a clear message.

Three kinds of check, each raising ConfigError that names the key and the fix:
- unknown keys (typos): a key set by a config file or override must be one RecBole or this
  project knows; the closest known key is suggested;
- types of the keys this project relies on (bool is not accepted as int);
- values and consistency (positive sizes, dropout in [0, 1), head_dim | expand * hidden_size,
  MAX_ITEM_LIST_LENGTH >= 2, known time_encoding / ssd_backend, all-positions training
  only for causal models).
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path

import recbole
import torch
import yaml

from pipeline.config import REPO_ROOT, ConfigError
from pipeline.precision import PRECISIONS
from pipeline.registry import SSD_MODELS

RECBOLE_PROPERTIES = Path(recbole.__file__).parent / "properties"
# RecBole's yaml files of download links: their keys are dataset names, not settings.
NOT_SETTINGS = {"url.yaml", "kg_url.yaml"}
# Keys RecBole's Config sets itself or reads without listing them in its yaml files, and
# the two this pipeline adds (pipeline/config.py).
RECBOLE_INTERNAL_KEYS = {
    "model",
    "dataset",
    "device",
    "MODEL_TYPE",
    "MODEL_INPUT_TYPE",
    "eval_type",
    "single_spec",
    "local_rank",
    "world_size",
    "nproc",
    "offset",
    "ip",
    "port",
    "valid_neg_sample_args",
    "test_neg_sample_args",
    "config_files",
    "overrides",
}

# The project's own keys and the types they take (bool is not accepted as int).
PROJECT_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "hidden_size": (int,),
    "num_layers": (int,),
    "d_state": (int,),
    "d_conv": (int,),
    "expand": (int,),
    "head_dim": (int,),
    "chunk_size": (int,),
    "dropout_prob": (float, int),
    "time_drop_out": (float, int),
    "norm_eps": (float, int),
    "p2p_residual": (bool,),
    "is_kai_ming_init": (bool,),
    "is_time": (bool,),
    "time_encoding": (str,),
    "ssd_backend": (str,),
    "ssd_kernel": (str,),
    "product_kernel": (str,),
    "triton_autotune": (str,),
    "MAX_ITEM_LIST_LENGTH": (int,),
    "train_batch_size": (int,),
    "eval_batch_size": (int,),
    "epochs": (int,),
    "learning_rate": (float, int),
    "weight_decay": (float, int),
    "stopping_step": (int,),
    "eval_step": (int,),
    "seed": (int,),
    "deterministic": (bool,),
    "dataset": (str,),
    "train_loader": (str,),
    "train_positions": (str,),
    "precision": (str,),
    "train_cuda_graph": (bool,),
    "fused_optimizer": (bool,),
    "triton_precompile": (bool,),
    "keep_host_memory": (bool,),
}
POSITIVE_KEYS = (
    "hidden_size",
    "num_layers",
    "d_state",
    "d_conv",
    "expand",
    "head_dim",
    "chunk_size",
    "train_batch_size",
    "eval_batch_size",
    "learning_rate",
    "norm_eps",
)
PROBABILITY_KEYS = ("dropout_prob", "time_drop_out")


def yaml_keys(path: Path) -> set[str]:
    """Top-level keys of a YAML mapping; an unreadable file contributes none (loading it as a
    config reports its own error)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    return {str(key) for key in data} if isinstance(data, dict) else set()


@functools.lru_cache(maxsize=1)
def known_keys() -> frozenset[str]:
    """Every key RecBole or this project defines: RecBole's properties (overall, dataset and
    model yaml files), every yaml under config/ and baseline/, and the internal keys above."""
    files = [RECBOLE_PROPERTIES / "overall.yaml"]
    for folder in ("dataset", "model", "quick_start_config"):
        files += sorted((RECBOLE_PROPERTIES / folder).glob("*.yaml"))
    for folder in ("config", "baseline"):
        files += sorted((REPO_ROOT / folder).rglob("*.yaml"))
    keys = set(RECBOLE_INTERNAL_KEYS) | set(PROJECT_KEY_TYPES)
    for path in files:
        if path.name not in NOT_SETTINGS:
            keys |= yaml_keys(path)
    return frozenset(keys)


def closest_key(key: str, known: frozenset[str]) -> str | None:
    """The known key most like `key`, case-insensitively ('max_item_list_length' finds
    'MAX_ITEM_LIST_LENGTH')."""
    by_lower = {k.lower(): k for k in sorted(known)}
    match = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[match[0]] if match else None


def key_source(config, key: str) -> str:
    """Where a key was set: an override or one of the run's config files."""
    if key in (config["overrides"] or {}):
        return f"--{key}=... override"
    for path in reversed(config["config_files"] or []):
        if key in yaml_keys(Path(path)):
            return str(path)
    return "the configuration"


def project_files(config) -> list[Path]:
    """The run's config files that live in config/ or baseline/ (their keys are known)."""
    folders = (REPO_ROOT / "config", REPO_ROOT / "baseline")
    paths = (Path(p).resolve() for p in config["config_files"] or [])
    return [p for p in paths if any(p.is_relative_to(folder) for folder in folders)]


def check_unknown_keys(config) -> None:
    known = known_keys()
    extra = set().union(*(yaml_keys(p) for p in project_files(config)))  # edited since cached
    for key in config.external_config_dict:
        if key in known or key in extra:
            continue
        suggestion = closest_key(key, known)
        hint = f"did you mean '{suggestion}'?" if suggestion else "remove it or fix its name."
        raise ConfigError(
            f"unknown config key '{key}' (in {key_source(config, key)}): {hint} Known keys are "
            "RecBole's settings and those in config/, config/model/ and baseline/"
        )


def check_types(config) -> None:
    for key, types in PROJECT_KEY_TYPES.items():
        if key not in config.final_config_dict or config[key] is None:
            continue
        value = config[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(
                f"config key {key} must be {names}, got {value!r} ({type(value).__name__})"
            )


def check_values(config) -> None:
    def value(key):
        return config[key] if key in config.final_config_dict else None

    for key in POSITIVE_KEYS:
        if value(key) is not None and value(key) <= 0:
            raise ConfigError(f"config key {key} must be positive, got {value(key)!r}")
    for key in PROBABILITY_KEYS:
        if value(key) is not None and not 0 <= value(key) < 1:
            raise ConfigError(
                f"config key {key} is a dropout probability in [0, 1), got {value(key)!r}"
            )
    length = value("MAX_ITEM_LIST_LENGTH")
    if length is not None and length < 2:
        raise ConfigError(
            f"MAX_ITEM_LIST_LENGTH must be >= 2 (a history and a target), got {length}"
        )
    head_dim, hidden, expand = value("head_dim"), value("hidden_size"), value("expand")
    if head_dim and hidden and expand and (expand * hidden) % head_dim:
        raise ConfigError(
            f"head_dim ({head_dim}) must divide expand * hidden_size ({expand} * {hidden} = "
            f"{expand * hidden}): the SSD splits its inner width into heads of head_dim"
        )
    for key, choices in choice_keys().items():
        if value(key) is not None and value(key) not in choices:
            raise ConfigError(
                f"config key {key} must be one of {', '.join(choices)}, got {value(key)!r}"
            )
    check_training_mode(config, value)


def choice_keys() -> dict[str, tuple[str, ...]]:
    """The project's keys that take one of a few names, and those names."""
    from models.backend import BACKENDS
    from models.layers import PRODUCT_KERNELS
    from models.triton_autotune import AUTOTUNE_MODES
    from pipeline.sequence_batches import TRAIN_LOADERS, TRAIN_POSITIONS  # they import us
    from ssd import SSD_KERNELS
    from tim4rec import TIME_ENCODINGS

    return {
        "time_encoding": TIME_ENCODINGS,
        "ssd_backend": BACKENDS,
        "ssd_kernel": SSD_KERNELS,
        "product_kernel": PRODUCT_KERNELS,
        "triton_autotune": AUTOTUNE_MODES,
        "train_loader": TRAIN_LOADERS,
        "train_positions": TRAIN_POSITIONS,
        "precision": PRECISIONS,
    }


def check_training_mode(config, value) -> None:
    """The device loader and all-positions training only where they apply: no RecBole
    batch transform or negative sampling, and only causal models on every position."""
    uses_device_loader = value("train_loader") == "device" or value("train_positions") == "all"
    negatives = (value("train_neg_sample_args") or {}).get("distribution", "none")
    if uses_device_loader and value("transform"):
        raise ConfigError(
            f"train_loader: device does not apply RecBole's batch transform "
            f"(transform: {value('transform')}, e.g. BERT4Rec's masking); use train_loader: recbole"
        )
    if uses_device_loader and negatives != "none":
        raise ConfigError(
            "train_loader: device draws no negative samples (train_neg_sample_args: "
            f"{negatives}); use train_loader: recbole, or loss_type: CE without negatives"
        )
    if value("time_encoding") == "causal" and value("is_time") and not value("p2p_residual"):
        raise ConfigError(
            "time_encoding: causal needs p2p_residual: True (the per-head gate reads the "
            "whole sequence)"
        )
    if value("train_cuda_graph"):
        check_cuda_graph(config, value, uses_device_loader)
    if value("train_positions") != "all":
        return
    if config["model"] not in SSD_MODELS:
        raise ConfigError(
            f"train_positions: all is implemented for {' and '.join(SSD_MODELS)}, "
            f"not {config['model']}"
        )
    if config["model"] == "TiM4Rec" and value("is_time") and value("time_encoding") != "causal":
        raise ConfigError(
            "train_positions: all needs a causal model: TiM4Rec's time path with "
            f"time_encoding: {value('time_encoding')} mixes all positions. Set "
            "--time_encoding=causal (with p2p_residual: True), or train_positions: last"
        )


def check_cuda_graph(config, value, uses_device_loader: bool) -> None:
    """train_cuda_graph: the device loader's padded batches, an SSD model, one CUDA device."""
    if config["model"] not in SSD_MODELS:
        raise ConfigError(
            f"train_cuda_graph is implemented for {' and '.join(SSD_MODELS)}, not "
            f"{config['model']}; set train_cuda_graph: False"
        )
    if not uses_device_loader:
        raise ConfigError(
            "train_cuda_graph needs batches of fixed shapes: set train_loader: device "
            "(or train_positions: all)"
        )
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError(
            "train_cuda_graph runs on one process only; set train_cuda_graph: False under torchrun"
        )
    if torch.device(value("device") or "cpu").type != "cuda":
        raise ConfigError("train_cuda_graph needs a CUDA device; set train_cuda_graph: False")


def validate_config(config) -> None:
    """Raise ConfigError naming the key, the value and the fix."""
    check_unknown_keys(config)
    check_types(config)
    check_values(config)
