"""Training precision: the names the `precision` key takes and the autocast each means."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(
    device_type: str, precision: str, cache_enabled: bool | None = None
) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for "bf16" (products and activations in bf16; weights, optimizer
    and loss reduction stay float32, so no loss scaling), nothing for "fp32".

    `cache_enabled=False` for CUDA-graph capture: a cached cast of a weight would be stale
    at replay, after the optimizer step.
    """
    if precision == "bf16":
        return torch.autocast(
            device_type=device_type, dtype=torch.bfloat16, cache_enabled=cache_enabled
        )
    if precision != "fp32":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()
