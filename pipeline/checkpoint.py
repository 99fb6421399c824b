"""Checkpoints as plain data: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: the model's
and optimizer's state dicts, the configuration the run was built from (a dict), the
dataset's identity and the training state. Nothing in it is unpickled as an object, so a
file that carries code is refused, never run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

FORMAT = "tim4rec-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says why and what to do."""


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write `payload` to `path` atomically: a temporary file in the same folder, then rename.

    A crash (even SIGKILL) leaves either the previous file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`, refusing anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects, which could run code "
            f"when loaded. This project's checkpoints are plain data; if you trust the file's "
            f"origin, re-export its state dict. ({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from None
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


def check_matches(payload: dict, expected: dict, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose identity fields (model, dataset, sizes) differ from `expected`."""
    identity = payload.get("identity", {})
    for key, want in expected.items():
        have = identity.get(key)
        if have != want:
            raise CheckpointError(
                f"checkpoint {path} does not match this run: {key} is {have!r} in the "
                f"checkpoint but {want!r} here"
            )
