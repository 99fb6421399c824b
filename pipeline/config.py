"""Command line and configuration: YAML files + `--key=value` overrides -> a RecBole Config.

Layers, lowest first: RecBole's defaults; `config/defaults.yaml` (the paper's protocol,
project paths); `config/model/<Model>.yaml` for the project's own models; the run's
config files (`--config`, several allowed); `--key=value` overrides.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path

from recbole.config import Config

from pipeline import compat

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"
PROTOCOL_DEFAULTS = CONFIG_DIR / "defaults.yaml"
DEFAULT_RUN_CONFIG = CONFIG_DIR / "config4ml-100k.yaml"


class ConfigError(ValueError):
    """A configuration or command line that cannot run; the message says how to fix it."""


@dataclass
class RunArgs:
    """What a command line asked for."""

    config_files: list[Path] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    checkpoint: Path | None = None


def parse_value(text: str):
    """'1e-3' -> 0.001, 'True' -> True, '[10,20]' -> [10, 20]; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv: list[str], allow_checkpoint: bool = False) -> RunArgs:
    """Parse `--config FILE` (repeatable), `--checkpoint FILE` and `--key=value` overrides.

    Paths are resolved against the current directory, so they stay valid after the
    pipeline moves to the repository root.
    """
    args = RunArgs()
    items = list(argv)
    while items:
        item = items.pop(0)
        if item in ("-h", "--help"):
            print(usage(allow_checkpoint))
            raise SystemExit(0)
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}\n{usage(allow_checkpoint)}")
        key, eq, value = item[2:].partition("=")
        if key in ("config", "checkpoint") and not eq:
            if not items:
                raise ConfigError(f"--{key} needs a file path")
            value = items.pop(0)
        elif not eq:
            raise ConfigError(f"{item!r}: overrides are written --key=value")
        if key == "config":
            args.config_files.append(_existing_file(value, "config file"))
        elif key == "checkpoint":
            if not allow_checkpoint:
                raise ConfigError(
                    "--checkpoint is for test.py; to resume training use --checkpoint_path=FILE"
                )
            args.checkpoint = _existing_file(value, "checkpoint")
        else:
            args.overrides[key] = parse_value(value)
    if "checkpoint_path" in args.overrides and args.overrides["checkpoint_path"]:
        args.overrides["checkpoint_path"] = str(
            _existing_file(args.overrides["checkpoint_path"], "checkpoint")
        )
    return args


def usage(allow_checkpoint: bool) -> str:
    lines = ["usage: python run.py [--config FILE ...] [--key=value ...]"]
    if allow_checkpoint:
        lines = ["usage: python test.py --checkpoint FILE [--key=value ...]"]
    lines.append("  --config FILE    a YAML file of RecBole/TiM4Rec keys (see config/); repeatable")
    lines.append("  --key=value      override one key, e.g. --dataset=amazon-beauty --epochs=5")
    return "\n".join(lines)


def _existing_file(path: str, what: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"{what} not found: {path}")
    return resolved


def model_defaults(model_class: type) -> list[Path]:
    """`config/model/<Class>.yaml` of the class and its bases, base first (SSD4Rec < TiM4Rec)."""
    paths = (CONFIG_DIR / "model" / f"{cls.__name__}.yaml" for cls in reversed(model_class.__mro__))
    return [path for path in paths if path.is_file()]


class ProjectConfig(Config):
    """RecBole's Config, fed only what the pipeline passes (it never reads sys.argv)."""

    def _load_cmd_line(self) -> dict:
        return {}


def build_config(model_class: type, config_files: list[Path], overrides: dict) -> Config:
    """Merge the layers for `model_class` and return a validated RecBole Config."""
    compat.apply()
    files = [PROTOCOL_DEFAULTS, *model_defaults(model_class), *map(Path, config_files)]
    config_dict = dict(overrides)
    for path_key in ("data_path", "checkpoint_dir"):
        if isinstance(config_dict.get(path_key), str):
            config_dict[path_key] = os.path.abspath(config_dict[path_key])
    config = ProjectConfig(
        model=model_class, config_file_list=[str(f) for f in files], config_dict=config_dict
    )
    # RecBole resolves relative paths against the working directory: anchor them at the
    # repository so that baseline/<Model>/run.py reads and writes the same folders.
    for key in ("checkpoint_dir",):
        if not os.path.isabs(config[key]):
            config[key] = str(REPO_ROOT / config[key])
    if not os.path.isabs(config["data_path"]):
        config["data_path"] = str(REPO_ROOT / config["data_path"])
    config["config_files"] = [str(f) for f in files]
    config["overrides"] = dict(overrides)
    return config
