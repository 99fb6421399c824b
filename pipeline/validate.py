"""Checks on a merged configuration, so that a bad key fails at start with a clear message."""

from __future__ import annotations

from pipeline.config import ConfigError

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
    "MAX_ITEM_LIST_LENGTH": (int,),
    "train_batch_size": (int,),
    "eval_batch_size": (int,),
    "epochs": (int,),
    "learning_rate": (float, int),
    "stopping_step": (int,),
    "seed": (int,),
}


def validate_config(config) -> None:
    """Raise ConfigError naming the key, the value and the fix."""
    for key, types in PROJECT_KEY_TYPES.items():
        if key not in config.final_config_dict or config[key] is None:
            continue
        value = config[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(
                f"config key {key} must be {names}, got {value!r} ({type(value).__name__})"
            )
    if config["MAX_ITEM_LIST_LENGTH"] is not None and config["MAX_ITEM_LIST_LENGTH"] < 2:
        raise ConfigError("MAX_ITEM_LIST_LENGTH must be >= 2 (a history and a target)")
    if config["head_dim"] and config["hidden_size"] and config["expand"]:
        d_inner = config["expand"] * config["hidden_size"]
        if d_inner % config["head_dim"]:
            raise ConfigError(
                f"head_dim ({config['head_dim']}) must divide expand * hidden_size ({d_inner})"
            )
