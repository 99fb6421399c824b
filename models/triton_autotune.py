"""Pinned autotune configurations for mamba-ssm's SSD Triton kernels.

Each SSD kernel in mamba-ssm is a `triton.autotune` over 4-12 configurations: the first
call of every kernel compiles and times all of them, 85-120 s at the start of a run on a
fresh machine. `pin` narrows each kernel's list to the winners measured at this project's
shapes (TiM4Rec/SSD4Rec: head dim 32, d_state 32, chunk 32, float32 and bf16), so a run
compiles one configuration per kernel and times none. ``search`` keeps
mamba-ssm's full lists. A pinned entry that matches none of the installed kernel's
configurations (another mamba-ssm version) leaves that kernel searching, with a warning.

`chosen` reads what the autotuners picked in this process: the source of `PINNED`
(`python -m benchmarks.benchmark --set triton_autotune=search` writes it to its JSON).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

logger = logging.getLogger(__name__)

AUTOTUNE_MODES = ("pinned", "search")
KERNEL_MODULES = (
    "ssd_bmm",
    "ssd_chunk_scan",
    "ssd_chunk_state",
    "ssd_combined",
    "ssd_state_passing",
)

# kernel ("module.function") -> the configurations kept, each (kwargs, num_warps, num_stages):
# the full search's winners, the same in float32 and in bf16 autocast but for one kernel,
# H200, ML-1M benchmark shape (B=2048, L=200, d=64), mamba-ssm 2.3.2.post1, Triton 3.6
# (docs/performance_notes.md; docs/results/autotune-h200/benchmark.json holds the search).
PINNED: dict[str, list[tuple[dict, int, int]]] = {
    "ssd_bmm._bmm_chunk_bwd_kernel": [
        ({"BLOCK_SIZE_CS": 32, "BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64}, 2, 5)
    ],
    "ssd_bmm._bmm_chunk_fwd_kernel": [
        ({"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32}, 2, 5)
    ],
    "ssd_chunk_scan._chunk_scan_bwd_dc_kernel": [({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32}, 4, 3)],
    "ssd_chunk_scan._chunk_scan_bwd_dcb_kernel": [({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32}, 4, 3)],
    "ssd_chunk_scan._chunk_scan_bwd_ddAcs_stable_kernel": [
        ({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32}, 4, 3)
    ],
    "ssd_chunk_scan._chunk_scan_bwd_dstates_kernel": [
        ({"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32}, 2, 5)
    ],
    "ssd_chunk_scan._chunk_scan_fwd_kernel": [
        ({"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64}, 2, 5)
    ],
    # float32 picked BLOCK_SIZE_H 8, bf16 4: at 4 heads, 8 only masks half of its block.
    "ssd_chunk_state._chunk_cumsum_bwd_kernel": [({"BLOCK_SIZE_H": 4}, 4, 3)],
    "ssd_chunk_state._chunk_cumsum_fwd_kernel": [({"BLOCK_SIZE_H": 4}, 4, 3)],
    "ssd_chunk_state._chunk_state_bwd_db_kernel": [
        ({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32}, 4, 3)
    ],
    "ssd_chunk_state._chunk_state_fwd_kernel": [
        ({"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32}, 2, 5)
    ],
    "ssd_combined._chunk_scan_chunk_state_bwd_dx_kernel": [
        ({"BLOCK_SIZE_K": 32, "BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64}, 4, 5)
    ],
    "ssd_state_passing._state_passing_bwd_kernel": [({"BLOCK_SIZE": 512}, 4, 3)],
    "ssd_state_passing._state_passing_fwd_kernel": [({"BLOCK_SIZE": 512}, 4, 3)],
}

# Each pinned kernel keeps its original list in this attribute, to restore. (On the object,
# not in a dict keyed by id(): ids of collected objects are reused.)
FULL_CONFIGS_ATTR = "_tim4rec_full_configs"


def autotuners() -> dict[str, object]:
    """mamba-ssm's autotuned SSD kernels by "module.function" ({} without Triton/mamba-ssm)."""
    import importlib

    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    found = {}
    for module_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"mamba_ssm.ops.triton.{module_name}")
        except Exception:  # absent or broken: the torch path runs
            continue
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{module_name}.{name}"] = value
    return found


def _signature(config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def pin(kernels: Mapping[str, object], table: Mapping[str, list] | None = None) -> list[str]:
    """Narrow every kernel named in `table` (default PINNED) to its listed configurations.

    Returns the names pinned. Idempotent; `unpin` restores the full lists.
    """
    table = PINNED if table is None else table
    pinned = []
    for name, kernel in kernels.items():
        wanted = table.get(name)
        if not wanted:
            continue
        full = getattr(kernel, FULL_CONFIGS_ATTR, None)
        if full is None:
            full = list(kernel.configs)
            setattr(kernel, FULL_CONFIGS_ATTR, full)
        keep = {(tuple(sorted(kw.items())), warps, stages) for kw, warps, stages in wanted}
        kept = [c for c in full if _signature(c) in keep]
        if len(kept) != len(keep):
            logger.warning(
                "pinned Triton configs for %s do not match this mamba-ssm's kernel: it keeps "
                "its full autotune search (%d configs)",
                name,
                len(full),
            )
            kernel.configs = full
            continue
        kernel.configs = kept
        pinned.append(name)
    return pinned


def unpin(kernels: Mapping[str, object]) -> None:
    """Give every kernel back its full list of configurations."""
    for kernel in kernels.values():
        full = getattr(kernel, FULL_CONFIGS_ATTR, None)
        if full is not None:
            kernel.configs = full


def check_mode(mode: str) -> None:
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"triton_autotune must be one of {AUTOTUNE_MODES}, got {mode!r}")


def configure(mode: str, kernels: Mapping[str, object] | None = None) -> list[str]:
    """Apply `mode` ("pinned" or "search") to mamba-ssm's kernels; returns the names pinned."""
    check_mode(mode)
    kernels = autotuners() if kernels is None else kernels
    if mode == "search":
        unpin(kernels)
        return []
    return pin(kernels)


def chosen(kernels: Mapping[str, object] | None = None) -> dict[str, list[dict]]:
    """The configurations the autotuners picked in this process, per kernel and tuning key."""
    kernels = autotuners() if kernels is None else kernels
    picked = {}
    for name, kernel in sorted(kernels.items()):
        entries = [
            {
                "key": [str(k) for k in key],
                "kwargs": dict(config.kwargs),
                "num_warps": config.num_warps,
                "num_stages": config.num_stages,
            }
            for key, config in kernel.cache.items()
        ]
        if entries:
            picked[name] = entries
    return picked


def table_from_chosen(picked: Mapping[str, list[dict]]) -> dict[str, list[tuple[dict, int, int]]]:
    """`chosen`'s output (from one or more runs, merged) as a PINNED table: the distinct
    winners per kernel."""
    table: dict[str, list[tuple[dict, int, int]]] = {}
    for name, entries in sorted(picked.items()):
        for e in entries:
            config = (dict(sorted(e["kwargs"].items())), e["num_warps"], e["num_stages"])
            if config not in table.setdefault(name, []):
                table[name].append(config)
    return table
