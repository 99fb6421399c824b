"""Which implementation runs a model's kernels: Triton on CUDA, or plain PyTorch.

One switch (the config key `ssd_backend`) for every op that has both: mamba-ssm's SSD scan
and gated norm, and this project's fused kernels (models/causal_conv_triton.py,
models/layer_norm_triton.py, models/hardswish_dropout_triton.py). ``"auto"`` takes Triton
on CUDA tensors when mamba-ssm's Triton kernels import, PyTorch otherwise.

mamba-ssm installed with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` has no compiled
``selective_scan_cuda``, and its package ``__init__`` imports it; `import_mamba_triton`
reaches the pure-Triton submodules without it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable

import torch

from models import triton_autotune

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")

_logged_backends: set[tuple[str, str]] = set()
_mamba_triton: tuple[Callable, Callable] | None | bool = False  # False: not tried yet
_autotune_mode = "pinned"  # set_triton_autotune; applied when the kernels are imported


def import_mamba_triton() -> tuple[Callable, Callable] | None:
    """Return mamba-ssm's (mamba_chunk_scan_combined, rmsnorm_fn), or None if unavailable."""
    global _mamba_triton
    if _mamba_triton is not False:
        return _mamba_triton
    _mamba_triton = None
    # Keep autotuning results on disk next to the compiled kernels (Triton's cache): a
    # search runs once per machine (~90 s unpinned); later runs reuse its choice.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if "mamba_ssm" not in sys.modules:
        try:
            import mamba_ssm  # noqa: F401
        except ImportError:
            # A skip-build install: the package __init__ needs selective_scan_cuda, the
            # Triton submodules do not. Register a bare package so they can be imported.
            spec = importlib.util.find_spec("mamba_ssm")
            if spec is None or spec.submodule_search_locations is None:
                return None
            package = types.ModuleType("mamba_ssm")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            sys.modules["mamba_ssm"] = package
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:  # a broken install must not stop the CPU path
        logger.warning("mamba-ssm found but its Triton kernels failed to import: %s", err)
        return None
    _mamba_triton = (mamba_chunk_scan_combined, rmsnorm_fn)
    triton_autotune.configure(_autotune_mode)
    return _mamba_triton


def set_triton_autotune(mode: str) -> None:
    """'pinned' (default): mamba-ssm's SSD kernels try only the configurations measured best
    at this project's shapes, so a run starts in seconds; 'search': their full autotuning.
    Process-wide, as the kernels are."""
    global _autotune_mode
    triton_autotune.check_mode(mode)
    _autotune_mode = mode
    if _mamba_triton:  # already imported: apply now
        triton_autotune.configure(mode)


def triton_available() -> bool:
    return torch.cuda.is_available() and import_mamba_triton() is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the implementation for tensors on `device`: 'auto' takes Triton on CUDA when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"ssd_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    elif backend == "triton":
        if device.type != "cuda":
            raise ValueError(
                "ssd_backend='triton' needs CUDA tensors; use 'auto' or 'torch' on CPU"
            )
        if import_mamba_triton() is None:
            raise ImportError(
                "ssd_backend='triton' needs mamba-ssm's Triton kernels: "
                "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
                "pip install --no-build-isolation --no-deps mamba-ssm (see README)"
            )
    if (backend, device.type) not in _logged_backends:
        _logged_backends.add((backend, device.type))
        where = "Triton kernels" if backend == "triton" else "pure PyTorch"
        logger.info("Kernel backend (ssd_backend) on %s: %s", device.type, where)
    return backend
