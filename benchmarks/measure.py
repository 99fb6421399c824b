"""Timing primitives: synchronised wall clocks, CUDA-event step timing, robust summaries."""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from pipeline.precision import autocast as precision_autocast


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """Run `fn` once and return (its result, seconds), queued GPU work included."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def time_calls(fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
    """Seconds of each of `n` back-to-back calls.

    On CUDA each call is bracketed by CUDA events and the host syncs once at the end, so
    the host may run ahead as in training; on CPU, a wall clock per call.
    """
    if device.type != "cuda":
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    sync(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    sync(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def gpu_busy(fn: Callable[[], object], device: torch.device, n: int):
    """(ms per call that the GPU spends in kernels and copies over `n` calls of `fn`, kernel
    launches per call, torch.profiler's key averages): the device's own time, whatever
    the host's. CUDA only."""
    sync(device)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(n):
            fn()
        sync(device)
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.self_device_time_total for e in on_device) / 1e3 / n
    return busy_ms, sum(e.count for e in on_device) / n, events


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict[str, float]:
    """Median, spread and extremes of repeated measurements."""
    return {
        "n": len(values),
        "median": statistics.median(values) if values else math.nan,
        "mean": statistics.fmean(values) if values else math.nan,
        "min": min(values, default=math.nan),
        "max": max(values, default=math.nan),
        "p10": percentile(values, 10),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def relative_spread(values: list[float]) -> float | None:
    """(max - min) / median of repeats, or None for a single repeat."""
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for precision "bf16", nothing for "fp32" (as in training)."""
    return precision_autocast(device.type, precision)


class FirstBatches:
    """The first `n` batches of a RecBole train loader, for a capped `Trainer._train_epoch`."""

    def __init__(self, loader, n: int) -> None:
        self.loader = loader
        self.n = n
        self.shuffle = getattr(loader, "shuffle", False)

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def release_cublas_workspaces(device: torch.device) -> None:
    """Free the workspaces cuBLAS keeps per (thread, stream) for the life of the process,
    so that the next benchmark row's peak memory does not count the last one's (on an H100:
    0.41 GiB with make_graphed_callables' streams, 0.19 GiB with one stream per graphed
    loss). Only between rows: a CUDA graph still alive would replay into the freed memory."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if device.type == "cuda" and clear is not None:
        torch.cuda.synchronize(device)
        clear()


def peak_memory_gib(device: torch.device) -> dict[str, float] | None:
    """Peak allocated and reserved GPU memory since the last reset, GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.max_memory_allocated(device) / 2**30,
        "reserved": torch.cuda.max_memory_reserved(device) / 2**30,
    }
