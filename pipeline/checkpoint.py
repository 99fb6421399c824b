"""Checkpoints as plain data: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: the model's
and optimizer's state dicts, the configuration the run was built from (a dict), the
dataset's identity and the training state. Nothing in it is unpickled as an object, so a
file that carries code is refused, never run.

Writing goes to a hidden temporary file next to the target (`.<name>.<random>.tmp`),
which is flushed, fsynced and then renamed over the target. A crash at any moment, even
SIGKILL or a full disk, leaves the previous file whole; at worst a `.tmp` file stays
behind, and `*.pth` never matches it. See docs/checkpoints.md.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

FORMAT = "tim4rec-checkpoint"
VERSION = 2  # 2: model_config, history, role, run_name, loader RNG states
TEMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written; the message says why and what to do."""


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write `payload` to `path` atomically: a temporary file in the same folder, then rename.

    A crash (even SIGKILL) leaves either the previous file or the new one, never a torn one.
    A failed write (full disk, Ctrl-C) removes its temporary file and raises; the previous
    file is untouched.
    """
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600; keep the usual umask permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise CheckpointError(
            f"could not write checkpoint {path}: {err.strerror or err}. "
            "The previous version of this file, if any, is unchanged; free disk space or "
            "set --checkpoint_dir to a writable folder."
        ) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files that an interrupted `save_checkpoint(path, ...)` may have left."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*{TEMP_SUFFIX}"))


def remove_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the leftovers of interrupted saves of `path` (only this file's, never others')."""
    removed = temp_files(path)
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`, refusing anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (it asks for {blocked.group(1)})" if blocked else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects{what}, which could run "
            "code when loaded, so it was not unpickled. This project's checkpoints are plain "
            "data; if you trust the file's origin, re-export its state dict."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file): {err}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a TiM4Rec-codebase checkpoint (no '{FORMAT}' format marker); "
            "only checkpoints written by run.py can be evaluated or resumed"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload.get('version')}, this code reads {VERSION}"
        )
    return payload


def check_matches(payload: dict, expected: dict, path: str | os.PathLike, what: str) -> None:
    """Refuse a checkpoint whose `payload[what]` fields differ from `expected`; name them all."""
    stored = payload.get(what) or {}
    differ = [
        key for key in sorted(set(stored) | set(expected)) if stored.get(key) != expected.get(key)
    ]
    if differ:
        details = "; ".join(
            f"{key} is {stored.get(key)!r} in the checkpoint but {expected.get(key)!r} here"
            for key in differ
        )
        raise CheckpointError(f"checkpoint {path} does not match this run: {details}")
