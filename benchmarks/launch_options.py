"""Swap a kernel module's launch options for a while: sweeps (benchmarks/ssd_kernels.py,
benchmarks/norm_kernels.py) and tests at other geometries (tests/test_causal_conv.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType


@contextlib.contextmanager
def launch_options(module: ModuleType, options: dict | None) -> Iterator[None]:
    """`module.LAUNCH_OPTIONS`' entries named in `options` replaced for the duration (None:
    as shipped); a "QUARTER_ELEMENTS" key sets that module constant (the LayerNorm's row
    block, which both its kernels read). Restored afterwards, also on error."""
    saved = {name: dict(o) for name, o in module.LAUNCH_OPTIONS.items()}
    saved_quarter = getattr(module, "QUARTER_ELEMENTS", None)
    options = dict(options or {})
    if "QUARTER_ELEMENTS" in options:
        module.QUARTER_ELEMENTS = options.pop("QUARTER_ELEMENTS")
    unknown = set(options) - set(module.LAUNCH_OPTIONS)
    if unknown:
        raise KeyError(f"{module.__name__} has no launch options for {sorted(unknown)}")
    module.LAUNCH_OPTIONS.update({name: dict(o) for name, o in options.items()})
    try:
        yield
    finally:
        module.LAUNCH_OPTIONS.clear()
        module.LAUNCH_OPTIONS.update(saved)
        if saved_quarter is not None:
            module.QUARTER_ELEMENTS = saved_quarter
