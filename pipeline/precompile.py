"""Compile a run's Triton kernels in parallel before its first step (`triton_precompile`).

On an empty Triton cache the first training step compiles each of mamba-ssm's SSD and norm
kernels (32 for TiM4Rec: forward, backward, evaluation shapes) one after the other as the
step reaches them, and Triton builds each kernel's C launcher with gcc at its first
launch: ~20-27 s on an H200, again for each new shape class. Compiling is mostly LLVM,
ptxas and gcc, which release the GIL, so threads compile side by side: ~4-5 s
(docs/performance_notes.md).

`precompile` runs each example batch once in a "dry" mode: every Triton launch becomes a
compile request (`triton.runtime._async_compile.AsyncCompileMode`, a thread pool) and
nothing launches; the PyTorch operations between kernels run on whatever the skipped
kernels left in their outputs. Those values are never used: the dry pass's gradients are
discarded, and every random state it draws from (dropout) is restored. When the requests
are done, the real steps find every kernel in Triton's in-memory cache.

An autotuned kernel with more than one configuration left (`triton_autotune: search`)
must launch to measure them; the dry pass skips it, and it compiles at its first real
call as before. The dry pass leans on Triton internals (3.6); if it fails for any reason,
a warning says so and the kernels compile at first use, as without it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from logging import getLogger
from time import perf_counter

import torch
from recbole.data.interaction import Interaction
from torch import nn

from tim4rec import POSITION_INDEX


@dataclass(frozen=True)
class PrecompileReport:
    seconds: float  # wall time of the dry pass
    issue_seconds: float = 0.0  # the dry pass itself, before waiting for the compiles
    spans: tuple = ()  # (submitted, started, done) seconds of each compile task
    skipped: str | None = None  # why nothing ran

    @property
    def kernels(self) -> int:
        """Kernels compiled (those in Triton's disk cache load at once)."""
        return len(self.spans)

    @property
    def compile_seconds(self) -> float:
        """Summed over the compile tasks, each with its launcher."""
        return sum(done - started for _, started, done in self.spans)

    @property
    def longest_seconds(self) -> float:
        return max((done - started for _, started, done in self.spans), default=0.0)


def triton_async_compile_available(device: torch.device) -> bool:
    """A CUDA device and Triton with AsyncCompileMode (3.4 and later)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from triton.runtime import _async_compile  # noqa: F401
    except ImportError:
        return False
    return True


class _CompileAndBuildLauncher:
    """An executor for AsyncCompileMode whose tasks also build the kernel's launcher (a C
    module Triton otherwise compiles with the system's C compiler at the kernel's first
    launch, in the launching thread) and record when each was submitted, started and done."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.start = perf_counter()
        self.spans: list[tuple[float, float, float]] = []  # submitted, started, done (s)

    def submit(self, compile_kernel: Callable) -> Future:
        return self.pool.submit(self._run, compile_kernel, perf_counter() - self.start)

    def _run(self, compile_kernel: Callable, submitted: float):
        from triton.runtime.driver import driver

        started = perf_counter() - self.start
        kernel = compile_kernel()
        # Cached in Triton's cache directory by its source: the first launch loads it.
        driver.active.launcher_cls(kernel.src, kernel.metadata)
        self.spans.append((submitted, started, perf_counter() - self.start))
        return kernel


class _InEveryThread:
    """Stands in for Triton's context variable holding the active AsyncCompileMode, which
    is set in one thread only: PyTorch runs a CUDA backward pass in its autograd thread,
    whose launches would compile one by one without it."""

    def __init__(self) -> None:
        self.mode = None

    def get(self):
        return self.mode

    def set(self, mode) -> None:
        self.mode = mode


@contextlib.contextmanager
def compile_only(workers: int) -> Iterator[list[tuple[float, float, float]]]:
    """Inside, Triton kernel launches compile on `workers` threads instead of running.

    Yields the compile tasks' (submitted, started, done) seconds, complete on exit: exit
    waits for the tasks and fills each kernel's in-memory cache, so the next real launch
    with the same specialisation compiles nothing. Patches Triton 3.6's `JITFunction.run`,
    `Autotuner.run` and its async-compile context variable for the duration.
    """
    from triton.runtime import _async_compile, autotuner
    from triton.runtime import jit as triton_jit

    launch = triton_jit.JITFunction.run
    tune = autotuner.Autotuner.run
    active_mode = _async_compile.active_mode

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    def pinned_only(self, *args, **kwargs):
        if len(self.configs) > 1:  # a search must launch to time its configurations
            return None
        return tune(self, *args, **kwargs)

    _async_compile.active_mode = _InEveryThread()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            executor = _CompileAndBuildLauncher(pool)
            with _async_compile.AsyncCompileMode(executor):
                triton_jit.JITFunction.run = compile_instead_of_launch
                autotuner.Autotuner.run = pinned_only
                try:
                    yield executor.spans
                finally:
                    triton_jit.JITFunction.run = launch
                    autotuner.Autotuner.run = tune
    finally:
        _async_compile.active_mode = active_mode


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restores the model's train/eval mode and every random state (CPU and CUDA)."""
    training = model.training
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            model.train(training)


def precompile(
    model: nn.Module,
    training_loss: Callable[[Interaction], torch.Tensor],
    train_batches: Iterable[Interaction],
    eval_batches: Iterable[Interaction] = (),
    workers: int | None = None,
) -> PrecompileReport:
    """Compiles, in parallel, the Triton kernels that a training step on each of
    `train_batches` (forward and backward of `training_loss`, on the model's device) and a
    full-ranking pass on each of `eval_batches` launch. Changes no weight, gradient,
    random state or mode of `model`."""
    device = next(model.parameters()).device
    if not triton_async_compile_available(device):
        return PrecompileReport(0.0, skipped="no CUDA device or no Triton AsyncCompileMode")
    params = [p for p in model.parameters() if p.requires_grad]
    workers = workers or min(32, os.cpu_count() or 1)
    start = perf_counter()
    try:
        with _untouched(model), compile_only(workers) as spans:
            model.train()
            for batch in train_batches:
                loss = training_loss(batch)
                torch.autograd.grad(loss, params, allow_unused=True)  # never into .grad
            model.eval()
            with torch.no_grad():
                for batch in eval_batches:
                    model.full_sort_predict(batch)
            issued = perf_counter() - start
    except Exception as err:  # never fatal: the kernels then compile at first use, as without
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        getLogger().warning(f"triton_precompile failed ({reason}); kernels compile at first use")
        return PrecompileReport(perf_counter() - start, skipped=reason)
    report = PrecompileReport(perf_counter() - start, issued, tuple(sorted(spans)))
    getLogger().info(
        f"compiled {report.kernels} Triton kernels ({report.compile_seconds:.1f} s of work, the "
        f"longest {report.longest_seconds:.1f} s) on {workers} threads in {report.seconds:.1f} s "
        "before the first step (triton_precompile)"
    )
    return report


def resized_samples(
    batch: Interaction, rows: int, length_field: str, max_length: int
) -> Interaction:
    """A batch of `rows` sequences from `batch`'s (one per row of `length_field`): its first
    rows, repeated as often as needed. An all-positions step's windows keep their targets
    (targets come ordered by window; POSITION_INDEX points into the new windows)."""
    data = batch.interaction
    n = len(data[length_field])
    device = data[length_field].device
    row_index = torch.arange(rows, device=device) % n
    target_index = row_index
    n_targets = -1
    if POSITION_INDEX in data:
        position = data[POSITION_INDEX]
        n_targets, copies = len(position), -(-rows // n)
        copy = torch.arange(copies, device=device).repeat_interleave(n_targets)
        window = (position // max_length).repeat(copies) + copy * n
        kept = window < rows
        target_index = torch.arange(n_targets, device=device).repeat(copies)[kept]
        new_position = (window * max_length + (position % max_length).repeat(copies))[kept]
    # Per target or per window by length; if equal, each window holds one target and
    # both indices agree. A 0-d field (the step weight) stays.
    resized = {
        k: v if v.dim() == 0 else v[target_index] if len(v) == n_targets else v[row_index]
        for k, v in data.items()
    }
    if POSITION_INDEX in data:
        resized[POSITION_INDEX] = new_position
    return Interaction(resized)


def specialisation_sizes(n: int) -> list[int]:
    """Sizes near `n`, one per power of two 1, 2, 4, 8, 16+ dividing them exactly: the
    classes of Triton's integer specialisation (divisible by 16 or not) of every argument
    proportional to a size (a size, its strides, c x size for any c)."""
    sizes = []
    for power in (1, 2, 4, 8):  # the largest m <= n with m = power (mod 2 * power)
        below = n - (n - power) % (2 * power)
        sizes.append(below if below >= power else power)
    sizes.append(max(16, n - n % 16))
    return sizes


def _with_tail(first: int, total: int, per_batch: int) -> list[int]:
    """`first` and the size of an epoch's last batch (`total` samples, `per_batch` each)."""
    tail = total % per_batch
    return [first] + ([tail] if 0 < tail < first else [])


def example_batches(
    config, train_data, valid_data, device: torch.device
) -> tuple[list[Interaction], list[Interaction]]:
    """Training and evaluation batches with the shapes a run's kernels meet: the first
    batch of each loader and one of the epoch's last batch size. The windows of an
    all-positions step vary: the first step and steps of `specialisation_sizes` windows.
    Iterating draws from the loaders' random states: the caller restores them.
    """
    length_field = config["ITEM_LIST_LENGTH_FIELD"]
    max_length = int(config["MAX_ITEM_LIST_LENGTH"])

    def resized(batch, sizes):
        return [resized_samples(batch, n, length_field, max_length) for n in sizes]

    first = next(iter(train_data)).to(device)
    n = len(first[length_field])
    if getattr(train_data, "pad_batches", False):  # every step has the same shape
        sizes = []
    elif POSITION_INDEX in first.interaction:
        sizes = sorted(set(specialisation_sizes(n)) - {n}, reverse=True)
    else:
        sizes = _with_tail(n, len(train_data.dataset), int(config["train_batch_size"]))[1:]
    train = [first] + resized(first, sizes)
    evaluation = []
    if valid_data:
        first_eval = next(iter(valid_data))[0].to(device)
        n = len(first_eval[length_field])
        evaluation = resized(
            first_eval, _with_tail(n, len(valid_data.dataset), int(config["eval_batch_size"]))
        )
    return train, evaluation
