"""Shared fixtures: small real data slices and the GPU skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data import BUNDLED

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_slice(folder: Path, name: str, source: Path, n_users: int) -> Path:
    """Copy the interactions of the first `n_users` users of an atomic file into folder/name/."""
    lines = source.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    keep: list[str] = []
    users: set[str] = set()
    for row in rows:
        user = row.split("\t", 1)[0]
        if user not in users:
            if len(users) == n_users:
                continue
            users.add(user)
        keep.append(row)
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.inter").write_text("\n".join([header, *keep]) + "\n")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy runner they make an epoch 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A run on `ml_tiny` that takes seconds: TiM4Rec-sized settings shrunk to one small layer.
TINY_RUN = {
    "dataset": "ml-tiny",
    "hidden_size": 16,
    "num_layers": 1,
    "MAX_ITEM_LIST_LENGTH": 10,
    "train_batch_size": 256,
    "eval_batch_size": 256,
    "show_progress": False,
}


@pytest.fixture(scope="session")
def ml_tiny(tmp_path_factory) -> Path:
    """data_path holding `ml-tiny`: the first 20 users of the bundled ml-100k."""
    folder = tmp_path_factory.mktemp("data")
    return write_slice(folder, "ml-tiny", BUNDLED["ml-100k"] / "ml-100k.inter", n_users=20)


@pytest.fixture(scope="session")
def ml100k_slice(tmp_path_factory) -> Path:
    """data_path holding `ml-slice`: the first 150 users of the bundled ml-100k."""
    folder = tmp_path_factory.mktemp("data")
    return write_slice(folder, "ml-slice", BUNDLED["ml-100k"] / "ml-100k.inter", n_users=150)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| (Frobenius norms), `got` from any device and dtype, `want`
    the float64 reference: how the kernel tests measure error."""
    got = got.detach().cpu().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def needs_triton_kernels() -> None:
    """Skip a CUDA test where mamba-ssm's Triton kernels (the Triton backend) are missing."""
    from models.backend import triton_available

    if not triton_available():
        pytest.skip("mamba-ssm's Triton kernels are not installed")


# Fixes to Triton's interpreter (3.6-3.9), prepended to the code it runs:
# - it holds a kernel's integer arguments as 1-element arrays and makes them Python ints
#   (`range(0, n, step)` in a kernel) with int(array), which numpy >= 2.4 refuses for
#   arrays of one dimension: take the element instead;
# - it stores bfloat16 as uint16 bit patterns and multiplies those in tl.dot (products of
#   ~1e10 for unit values): widen bfloat16 operands to float32 first;
# - Triton 3.9's interpreter makes a block mask & a scalar condition (`mask & (k >= 0)`
#   with k from constexprs) int32, then its masked loads and stores refuse that mask
#   ("mask has unsupported dtype"): give them the mask as bool.
# And one check: every launch of a kernel in models/ passes models.triton_launch's
# COMPILE_OPTIONS (the interpreter ignores them; the compiler does not).
INTERPRETER_FIXES = """
import triton.language as _tl
import triton.runtime.interpreter as _interpreter
_patch = _interpreter._patch_lang_tensor
def _patch_lang_tensor(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_interpreter._patch_lang_tensor = _patch_lang_tensor
_dot = _interpreter.InterpreterBuilder.create_dot
def _create_dot(self, a, b, d, *args):
    a, b = (self.cast_impl(t, _tl.float32) if t.dtype.scalar == _tl.bfloat16 else t
            for t in (a, b))
    return _dot(self, a, b, d, *args)
_interpreter.InterpreterBuilder.create_dot = _create_dot
def _bool_mask(mask):
    if mask.data.dtype == bool:
        return mask
    return _interpreter.TensorHandle(mask.data.astype(bool), _tl.int1)
_load = _interpreter.InterpreterBuilder.create_masked_load
def _create_masked_load(self, ptrs, mask, *args):
    return _load(self, ptrs, _bool_mask(mask), *args)
_interpreter.InterpreterBuilder.create_masked_load = _create_masked_load
_store = _interpreter.InterpreterBuilder.create_masked_store
def _create_masked_store(self, ptrs, value, mask, *args):
    return _store(self, ptrs, value, _bool_mask(mask), *args)
_interpreter.InterpreterBuilder.create_masked_store = _create_masked_store
_run = _interpreter.InterpretedFunction.run
def _run_pinned(self, *args, **kwargs):  # see models/triton_launch.py
    if self.fn.__module__.startswith("models.") and kwargs.get("enable_fp_fusion") is not True:
        raise AssertionError(f"{self.fn.__name__} launched without models.triton_launch's options")
    return _run(self, *args, **kwargs)
_interpreter.InterpretedFunction.run = _run_pinned
"""


def run_in_triton_interpreter(code: str) -> None:
    """Run `code` (printing 'ok' when its checks pass) with TRITON_INTERPRET=1 in a
    subprocess, so the setting does not leak into other tests; skips without Triton."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETER_FIXES + code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
