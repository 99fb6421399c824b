"""Speed and memory benchmark: TiM4Rec against its peers, one command, one table.

    python -m benchmarks.benchmark                        # GPU: ML-1M-shaped workload
    python -m benchmarks.benchmark --device cpu           # CPU: a smaller shape, minutes
    python -m benchmarks.benchmark --models TiM4Rec,SASRec --repeat 2 --time-budget 420

Every model is built through the project's pipeline (pipeline.config.build_config,
RecBole's dataset and loaders through pipeline.data.load_data, ProjectTrainer) at the
paper's configuration, on one dataset shared by all models. Per model (TiM4Rec: per SSD
backend and in float32 and bf16 autocast) it measures training ms per step on real
batches, a warm epoch through the trainer's own loop (data loading included), the first
epoch's extra seconds (compilation, autotuning), peak GPU memory, a full-ranking
evaluation of all users and the latency of scoring one user, and compares TiM4Rec's step
with the hardware floor (benchmarks/floor.py). One failing model never loses the others:
results are written to JSON after every stage. docs/benchmark.md explains every column.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import logging
import lzma
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from recbole.utils import init_seed

from benchmarks import floor as floor_model
from benchmarks import measure, report
from benchmarks.synthetic import ML1M, ML1M_SMALL, SyntheticSpec, ensure_dataset
from models import triton_autotune
from models.backend import triton_available
from pipeline.config import REPO_ROOT, build_config, parse_value
from pipeline.data import load_data
from pipeline.host_memory import keep_freed_memory
from pipeline.inference import InferenceError, Recommender
from pipeline.precision import PRECISIONS
from pipeline.registry import SSD_MODELS, get_model_class, model_names
from pipeline.sequence_batches import ALL_POSITIONS, make_train_loader
from pipeline.trainer import ProjectTrainer
from pipeline.validate import validate_config
from ssd import SSD_KERNELS

# models with a torch/triton choice, and the config key that makes it
BACKEND_KEYS = {"TiM4Rec": "ssd_backend", "SSD4Rec": "ssd_backend", "Mamba4Rec": "mamba_backend"}
BACKENDS = ("torch", "triton")
# Training modes of the SSD models (pipeline/sequence_batches.py) and the config they set:
# "device": RecBole's samples, batches built on the GPU; "all": every position at once,
# with TiM4Rec's causal time encoding.
MODES = {
    "device": {"train_loader": "device"},
    "all": ALL_POSITIONS,
    "graph": {**ALL_POSITIONS, "train_cuda_graph": True},  # all positions, CUDA graphs
}
FIRST = ("TiM4Rec", "SSD4Rec", "SASRec", "Mamba4Rec")  # the issue's models lead the table
MOVIE_CONFIG = REPO_ROOT / "config" / "config4movie_64d.yaml"
BEAUTY_CONFIG = REPO_ROOT / "config" / "config4beauty_64d.yaml"
SHARED_BEAUTY = (
    REPO_ROOT.parent / "shared" / "datasets" / "amazon-beauty" / "amazon-beauty.inter.xz"
)
SMOKE = SyntheticSpec(
    "ml-1m-synthetic-smoke", n_users=40, n_items=120, n_interactions=1600, max_length=80
)


class BenchmarkError(ValueError):
    """A command line that cannot run; the message says how to fix it."""


@dataclass
class Workload:
    """The data and the measurement sizes of one benchmark run."""

    name: str
    description: str
    dataset: str
    overrides: dict  # config keys shared by every model
    spec: SyntheticSpec | None = None  # None: real data
    config_files: list[Path] = field(default_factory=list)  # TiM4Rec's paper file (SSD models)
    ssd_overrides: dict = field(default_factory=dict)  # more TiM4Rec keys (SSD models)
    warmup_steps: int = 3  # first steps, timed one by one: compilation and autotuning
    step_repeats: int = 20  # timed warm steps per repeat
    prefetch_batches: int = 8  # real batches moved to the device before the step timing
    latency_calls: int = 200  # single-user scorings per repeat
    epoch_steps: int | None = None  # cap on the warm epoch (then extrapolated)


def make_workload(name: str, quick: bool, data_file: str | None) -> Workload:
    paper_ml1m = {"MAX_ITEM_LIST_LENGTH": 200, "train_batch_size": 2048, "eval_batch_size": 4096}
    if name == "ml-1m":
        work = Workload(
            "ml-1m",
            "synthetic ML-1M shape (6,040 users, 3,416 items, 1,000,209 interactions), "
            "paper config: B=2048, L=200, d=64, 2 layers, CE over all items",
            ML1M.name,
            paper_ml1m,
            spec=ML1M,
            config_files=[MOVIE_CONFIG] if MOVIE_CONFIG.is_file() else [],
        )
    elif name == "cpu":
        work = Workload(
            "cpu",
            "synthetic ML-1M-like, smaller (600 users, 1,200 items, 40,000 interactions), "
            "B=256, L=50, d=64, 2 layers, CE over all items",
            ML1M_SMALL.name,
            {"MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": 256, "eval_batch_size": 600},
            spec=ML1M_SMALL,
            warmup_steps=2,
            step_repeats=3,
            prefetch_batches=3,
            latency_calls=20,
            epoch_steps=10,  # a CPU step takes seconds: 10 batches, extrapolated
        )
    elif name == "smoke":  # the test suite's end-to-end run: seconds
        work = Workload(
            "smoke",
            "tiny synthetic log (40 users), B=32, L=20: a functional check, not a benchmark",
            SMOKE.name,
            {"MAX_ITEM_LIST_LENGTH": 20, "train_batch_size": 32, "eval_batch_size": 64},
            spec=SMOKE,
            warmup_steps=1,
            step_repeats=2,
            prefetch_batches=2,
            latency_calls=3,
            epoch_steps=3,
        )
    elif name == "amazon-beauty":
        shared = {"MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": 2048, "eval_batch_size": 4096}
        work = Workload(
            "amazon-beauty",
            "Amazon Beauty 5-core (real data), paper config beauty_64d: B=2048, L=50, d=64",
            "amazon-beauty",
            shared,
            config_files=[BEAUTY_CONFIG] if BEAUTY_CONFIG.is_file() else [],
        )
        if not work.config_files:  # the paper's beauty_64d values (../shared/TIM4REC_SPEC.md)
            work.ssd_overrides = {
                "dropout_prob": 0.4,
                "time_drop_out": 0.0,
                "norm_eps": 1e-5,
                "p2p_residual": True,
                "is_kai_ming_init": False,
            }
        work.overrides["data_path"] = str(locate_beauty(data_file))
    else:
        raise BenchmarkError(
            f"unknown workload {name!r}; choose ml-1m, cpu, smoke or amazon-beauty"
        )
    if quick:
        work = replace(
            work,
            step_repeats=max(2, work.step_repeats // 2),
            latency_calls=max(3, work.latency_calls // 4),
            epoch_steps=work.epoch_steps or 100,
        )
    return work


def locate_beauty(data_file: str | None) -> Path:
    """The data_path holding amazon-beauty/amazon-beauty.inter, decompressing the shared copy."""
    prepared = REPO_ROOT / "dataset" / "amazon-beauty" / "amazon-beauty.inter"
    if data_file is None and prepared.is_file():
        return prepared.parent.parent
    source = Path(data_file).expanduser().resolve() if data_file else SHARED_BEAUTY
    if not source.is_file():
        raise BenchmarkError(
            f"Amazon Beauty data not found ({source}). Prepare it with\n"
            "  python -m datatools prepare amazon-beauty <raw file>\n"
            "or pass --data-file <amazon-beauty.inter or .inter.xz>"
        )
    if source.suffix != ".xz":
        if source.name != "amazon-beauty.inter":
            raise BenchmarkError(f"--data-file must be named amazon-beauty.inter(.xz): {source}")
        return source.parent.parent
    cache = REPO_ROOT / "dataset" / ".benchmark-cache"  # git-ignored (/dataset/*)
    target = cache / "amazon-beauty" / "amazon-beauty.inter"
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        with lzma.open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(target)
    return cache


@dataclass(frozen=True)
class Variant:
    """One table row: a model, its SSD backend (SSD models only), a precision, a training
    mode (SSD models only: None or a key of MODES) and the Triton backend's SSD scan (SSD
    models only: None for the configured one, or one of ssd.SSD_KERNELS)."""

    model: str
    backend: str | None
    precision: str
    mode: str | None = None
    kernel: str | None = None

    @property
    def label(self) -> str:
        parts = (self.model, self.backend, self.precision, self.mode, self.kernel)
        return ":".join(p for p in parts if p)

    @property
    def all_positions(self) -> bool:
        """Trains on every position: steps of ~B targets in a varying number of windows."""
        return MODES.get(self.mode, {}).get("train_positions") == "all"


def available_backends(device: torch.device) -> list[str]:
    """SSD backends runnable here, best first."""
    if device.type != "cuda":
        return ["torch"]
    return ["triton", "torch"] if triton_available() else ["torch"]


def error_text(err: Exception) -> str:
    """A failed stage's error for the table: its type and the first line of its message
    (the type alone when the message is empty)."""
    first = (str(err).splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def parse_models(text: str | None, device: torch.device) -> list[Variant]:
    """`--models` -> table rows, in the order given.

    `TiM4Rec` expands to every available SSD backend x {fp32, bf16}; `SSD4Rec` to the best
    backend in fp32; other models to fp32. `Name:opt[:opt]` picks one row (opts:
    torch/triton, fp32/bf16, and for the SSD models the training mode device/all/graph and
    the SSD scan fused/mamba).
    `all` (the default on CUDA): every registered model, the issue's four first, TiM4Rec's
    all-positions rows and slower backend after them; `core` (the default on CPU): only
    TiM4Rec (with its all-positions rows), SSD4Rec, SASRec and Mamba4Rec.
    """
    names = model_names()
    backends = available_backends(device)
    if text is None:
        text = "all" if device.type == "cuda" else "core"
    if text.strip() in ("all", "core"):
        others = [n for n in names if n not in FIRST] if text.strip() == "all" else []
        tim = expand("TiM4Rec", None, None, backends)
        fast = [v for v in tim if v.backend == backends[0]]
        rest = [v for v in tim if v.backend != backends[0]]
        all_positions = [replace(v, mode="all") for v in fast]
        return (
            fast
            + [v for n in FIRST[1:] for v in expand(n, None, None, backends)]
            + all_positions
            + rest
            + [v for n in others for v in expand(n, None, None, backends)]
        )
    rows: list[Variant] = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        name, *options = token.split(":")
        if name not in names:
            raise BenchmarkError(
                f"unknown model {name!r} in --models; choose from {', '.join(names)}"
            )
        known = BACKENDS + PRECISIONS + tuple(MODES) + SSD_KERNELS
        unknown = [o for o in options if o not in known]
        if unknown:
            raise BenchmarkError(
                f"--models {token!r}: unknown option {unknown[0]!r}; use torch/triton, "
                "fp32/bf16, device/all/graph, fused/mamba"
            )
        backend = next((o for o in options if o in BACKENDS), None)
        precision = next((o for o in options if o in PRECISIONS), None)
        mode = next((o for o in options if o in MODES), None)
        kernel = next((o for o in options if o in SSD_KERNELS), None)
        if (mode or kernel) and name not in SSD_MODELS:
            raise BenchmarkError(
                f"--models {token!r}: the training modes device/all/graph and the SSD scans "
                f"fused/mamba are for {', '.join(SSD_MODELS)}"
            )
        if backend and name not in BACKEND_KEYS:
            raise BenchmarkError(
                f"--models {token!r}: only {', '.join(BACKEND_KEYS)} have torch/triton backends"
            )
        if backend and backend not in backends:
            raise BenchmarkError(
                f"--models {token!r}: SSD backend {backend!r} is not available on "
                f"{device.type} (available: {', '.join(backends)}); triton needs CUDA and "
                "mamba-ssm's Triton kernels"
            )
        rows.extend(
            replace(v, mode=mode, kernel=kernel) for v in expand(name, backend, precision, backends)
        )
    if not rows:
        raise BenchmarkError("--models names no model")
    return rows


def expand(
    name: str, backend: str | None, precision: str | None, backends: list[str]
) -> list[Variant]:
    if name not in BACKEND_KEYS:
        return [Variant(name, None, precision or "fp32")]
    if name == "TiM4Rec":
        chosen = [backend] if backend else backends
        precisions = [precision] if precision else list(PRECISIONS)
    else:
        chosen = [backend or backends[0]]
        precisions = [precision or "fp32"]
    return [Variant(name, b, p) for b in chosen for p in precisions]


@contextlib.contextmanager
def capture_logs(prefixes: tuple[str, ...] = ("models", "ssd", "tim4rec")):
    """Collect the INFO messages of the project's model modules (RecBole's logger is unset)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(level=logging.INFO)
    loggers = [logging.getLogger(name) for name in prefixes]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


class Benchmark:
    """One run: the shared data, the rows measured so far, the outputs."""

    def __init__(self, args: argparse.Namespace, work: Workload, device: torch.device) -> None:
        self.args = args
        self.work = work
        self.device = device
        self.out_dir = Path(args.out)
        self.deadline = time.perf_counter() + args.time_budget if args.time_budget else math.inf
        self.started = time.perf_counter()
        self.checkpoint_dir = Path(tempfile.mkdtemp(prefix="benchmark-ckpt-"))
        self.overrides = {
            "dataset": work.dataset,
            "show_progress": False,
            "epochs": 1,
            "checkpoint_dir": str(self.checkpoint_dir),  # nothing is saved there
            "use_gpu": device.type == "cuda",
            **work.overrides,
            **dict(args.set or []),
        }
        self._data: dict[tuple, tuple | Exception] = {}
        self.rows_left = 1
        self.result: dict = {
            "environment": report.environment(device),
            "meta": {
                "command": " ".join(sys.argv),
                "started": datetime.now().isoformat(timespec="seconds"),
                "workload": work.name,
                "workload_description": work.description,
                "overrides": self.overrides,
                "config_files": [str(f) for f in work.config_files],
                "repeat": args.repeat,
                "time_budget_s": args.time_budget,
                "notes": [],
            },
            "floor": {},
            "rows": [],
        }

    # -- time budget -------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self) -> float:
        """This row's fair share of the time left (infinite without a budget)."""
        return self.remaining() / max(1, self.rows_left)

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    # -- outputs -----------------------------------------------------------------------
    def flush(self) -> None:
        self.result["meta"]["elapsed_s"] = time.perf_counter() - self.started
        if self.device.type == "cuda":  # what mamba-ssm's autotuners picked (the PINNED source)
            self.result["meta"]["triton_autotune_chosen"] = triton_autotune.chosen()
        report.write_json_atomic(self.out_dir / "benchmark.json", self.result)
        report.write_text_atomic(self.out_dir / "benchmark.md", report.markdown_table(self.result))

    # -- data --------------------------------------------------------------------------
    def config(self, model_name: str, extra: dict | None = None):
        model_class = get_model_class(model_name)
        # The paper's config file is TiM4Rec's; the baselines keep their own model defaults
        # and share the data keys (dataset, L, batch sizes) through the overrides.
        ssd = model_name in SSD_MODELS
        files = self.work.config_files if ssd else []
        overrides = {**(self.work.ssd_overrides if ssd else {}), **self.overrides, **(extra or {})}
        config = build_config(model_class, files, overrides)
        validate_config(config)
        return model_class, config

    def data(self, config) -> tuple:
        """(dataset, train, valid, test), built once per data configuration and shared."""
        keys = (
            "dataset", "data_path", "MAX_ITEM_LIST_LENGTH", "train_batch_size", "eval_batch_size",
            "load_col", "eval_args", "train_neg_sample_args", "user_inter_num_interval",
            "item_inter_num_interval", "MODEL_TYPE", "seed",
        )  # fmt: skip
        signature = tuple(str(config[k]) for k in keys)
        if signature not in self._data:
            self.log(f"building the RecBole dataset {config['dataset']} (once, shared)")
            try:
                loaded, seconds = measure.wall(lambda: load_data(config), torch.device("cpu"))
            except Exception as err:  # remembered: the next rows fail at once, not slowly
                self._data[signature] = err
                raise
            self._data[signature] = loaded
            self.describe_data(loaded, seconds)
        loaded = self._data[signature]
        if isinstance(loaded, Exception):
            raise RuntimeError(f"the dataset could not be built: {loaded}")
        return loaded

    def describe_data(self, loaded: tuple, seconds: float) -> None:
        dataset, train, valid, _ = loaded
        meta = self.result["meta"]
        meta["data_load_s"] = seconds
        meta["data"] = {
            "users": int(dataset.user_num) - 1,
            "items": int(dataset.item_num) - 1,
            "samples": int(dataset.inter_num),  # every interaction but a user's first
            "train_samples": len(train.dataset),
            "train_batches": len(train),
            "eval_users": len(valid.dataset),
        }
        # RecBole's own per-batch assembly on the CPU (and the copy to the device).
        n = min(len(train), 50)

        def load() -> None:
            for batch in measure.FirstBatches(train, n):
                batch.to(self.device)

        next(iter(train)).to(self.device)  # not timed: CUDA context, first iterator
        _, loader_s = measure.wall(load, self.device)
        meta["loader"] = {"batches": n, "ms_per_batch": 1e3 * loader_s / n,
                          "epoch_s": loader_s / n * len(train)}  # fmt: skip
        self.log(f"data ready in {seconds:.1f} s: {meta['data']}")
        self.flush()

    def floors(self) -> None:
        """The floor of TiM4Rec's training step at this workload, fp32 and bf16."""
        try:
            _, config = self.config("TiM4Rec")
            dataset = self.data(config)[0]
            shape = floor_model.StepShape.from_config(config, dataset.item_num)
        except Exception as err:  # the floor is a header line, never fatal
            self.result["meta"]["notes"].append(f"floor not computed: {type(err).__name__}: {err}")
            return
        peaks = self.peaks()
        for precision in PRECISIONS:
            self.result["floor"][precision] = floor_model.floor(
                shape, precision, peaks, allow_tf32=torch.backends.cuda.matmul.allow_tf32
            )

    def peaks(self) -> dict | None:
        if self.device.type != "cuda":
            return None
        peaks = floor_model.device_peaks(torch.cuda.get_device_name(self.device))
        note = "no peak FLOP/s and bandwidth known for this GPU: add it to benchmarks/floor.py"
        if peaks is None and note not in self.result["meta"]["notes"]:
            self.result["meta"]["notes"].append(note)
        return peaks

    # -- one row -----------------------------------------------------------------------
    def run_variant(self, variant: Variant, rows_left: int) -> None:
        row: dict = {"model": variant.model, "backend": variant.backend,
                     "precision": variant.precision, "mode": variant.mode,
                     "ssd_kernel": variant.kernel,
                     "status": "running", "errors": {}}  # fmt: skip
        self.result["rows"].append(row)
        if self.remaining() <= 0:
            row.update(status="skipped", errors={"all": "time budget spent"})
            self.log(f"{variant.label}: skipped (time budget spent)")
            return
        self.log(f"{variant.label}: start")
        self.rows_left = rows_left
        measure.reset_peak_memory(self.device)
        try:
            state = self.build(variant, row)
        except Exception as err:
            unavailable = isinstance(err, ImportError)
            row.update(status="unavailable" if unavailable else "error")
            row["errors"]["build"] = error_text(err)
            self.log(f"{variant.label}: {row['status']}: {row['errors']['build']}")
            if not unavailable:
                traceback.print_exc()
            return
        stages = (
            ("steps", self.measure_steps),
            *((("profile", self.profile_steps),) if self.args.profile else ()),
            ("epoch", self.measure_epoch),
            ("eval", self.measure_eval),
            ("latency", self.measure_latency),
        )
        for name, stage in stages:
            if name != "steps" and self.remaining() <= 0:
                row["errors"][name] = "skipped: time budget spent"
                continue
            try:
                stage(state, row)
            except Exception as err:  # one failing stage keeps the others
                row["errors"][name] = error_text(err)
                self.log(f"{variant.label}: {name} failed: {row['errors'][name]}")
                traceback.print_exc()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            row["peak_memory_gib"] = measure.peak_memory_gib(self.device)
            self.flush()
        self.finish_row(state, row)
        del state
        gc.collect()
        measure.release_cublas_workspaces(self.device)  # no graph of this row is left

    def build(self, variant: Variant, row: dict) -> dict:
        extra = {BACKEND_KEYS[variant.model]: variant.backend} if variant.backend else {}
        extra.update(MODES.get(variant.mode, {}))  # SSD4Rec ignores the time encoding keys
        if variant.kernel:
            extra["ssd_kernel"] = variant.kernel
        if variant.mode == "graph":  # the graphed loss applies the config's precision itself
            extra["precision"] = variant.precision
        model_class, config = self.config(variant.model, extra)
        dataset, train, valid, test = self.data(config)
        train = make_train_loader(config, train, self.device)  # a mode's loader, else RecBole's
        init_seed(config["seed"], config["reproducibility"])
        with capture_logs() as messages:  # e.g. which Mamba mixer or SSD backend runs
            model = model_class(config, train.dataset).to(self.device)
            trainer = ProjectTrainer(config, model, dataset)
        trainer._saving = False  # as fit(saved=False): no checkpoint inside the timed epoch
        row["log"] = messages
        row["cudnn"] = {
            "deterministic": torch.backends.cudnn.deterministic,
            "benchmark": torch.backends.cudnn.benchmark,
        }
        row["parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row["batch_size"] = int(config["train_batch_size"])
        row["seq_len"] = int(config["MAX_ITEM_LIST_LENGTH"])
        if variant.model in SSD_MODELS:
            # all positions: the floor of its own step, ~W windows of L scoring B targets
            windows = (
                round(len(train.window_targets) / len(train)) if variant.all_positions else None
            )
            shape = floor_model.StepShape.from_config(
                config, dataset.item_num, is_time=model.is_time, windows=windows
            )
            row["floor"] = floor_model.floor(
                shape, variant.precision, self.peaks(),
                allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            )  # fmt: skip
        return {"config": config, "model": model, "trainer": trainer, "train": train,
                "valid": valid, "test": test, "variant": variant}  # fmt: skip

    def amp(self, state: dict):
        return measure.autocast(self.device, state["variant"].precision)

    def loss(self, state: dict, batch) -> torch.Tensor:
        trainer = state["trainer"]
        if trainer.graphed_loss is not None:  # graphed: its own precision, no outer autocast
            return trainer.training_loss(batch)
        with self.amp(state):
            return state["model"].calculate_loss(batch)

    def train_step(self, state: dict, batch) -> torch.Tensor:
        optimizer = state["trainer"].optimizer
        optimizer.zero_grad()
        loss = self.loss(state, batch)
        loss.backward()
        optimizer.step()
        return loss

    def measure_steps(self, state: dict, row: dict) -> None:
        """ms per training step on real batches already on the device; the first steps
        (compilation, autotuning) are timed apart."""
        work, device = self.work, self.device
        trainer = state["trainer"]
        with self.amp(state):  # the eager loss and the evaluation as measured below
            _, precompile_s = measure.wall(
                lambda: trainer.precompile_kernels(
                    state["train"], state["valid"], loss_func=trainer.eager_loss
                ),
                device,
            )
        state["model"].train()
        batches = [
            b.to(device) for b in measure.FirstBatches(state["train"], work.prefetch_batches)
        ]
        first = []
        for i in range(work.warmup_steps):
            _, seconds = measure.wall(
                lambda i=i: self.train_step(state, batches[i % len(batches)]), device
            )
            first.append(seconds)
        # The epoch's last, smaller batch has its own kernel specialisations: compile them now.
        n_last = len(state["train"].dataset) % row["batch_size"]
        if state["variant"].all_positions:  # steps vary in size: no tail shape
            n_last = 0
        tail_s = None
        if n_last:
            _, tail_s = measure.wall(lambda: self.train_step(state, batches[0][:n_last]), device)
        # A very slow model gets fewer timed steps: at most a fifth of its share of the time.
        repeats = work.step_repeats
        if first and first[-1] * repeats * self.args.repeat > self.share() / 5:
            repeats = max(2, int(self.share() / 5 / self.args.repeat / max(first[-1], 1e-6)))
            repeats = min(repeats, work.step_repeats)
        medians, all_times = [], []
        cycle = itertools.cycle(batches)  # different real batches, all already on the device
        for _ in range(self.args.repeat):
            times = measure.time_calls(lambda: self.train_step(state, next(cycle)), device, repeats)
            all_times.append(times)
            medians.append(measure.summary(times)["median"])
        loss = self.train_step(state, batches[0])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()}")
        step_s = statistics.median(medians)
        warm_tail = step_s * n_last / row["batch_size"]
        row.update(
            step_ms=1e3 * step_s,
            step_ms_repeats=[1e3 * m for m in medians],
            step_ms_spread=measure.relative_spread(medians),
            step_ms_summary={k: (1e3 * v if k != "n" else v) for k, v in
                             measure.summary([t for ts in all_times for t in ts]).items()},
            samples_per_s=row["batch_size"] / step_s,
            first_steps_s=first,
            precompile_s=precompile_s,
            train_compile_extra_s=precompile_s
            + max(0.0, sum(first) - len(first) * step_s)
            + (max(0.0, tail_s - warm_tail) if tail_s is not None else 0.0),
        )  # fmt: skip
        floor = row.get("floor") or {}
        if "floor_ms" in floor:
            row["step_over_floor"] = row["step_ms"] / floor["floor_ms"]
        self.update_first_epoch(row)
        self.log(f"{state['variant'].label}: {row['step_ms']:.2f} ms/step, first steps {first}")

    def profile_steps(self, state: dict, row: dict, steps: int = 5) -> None:
        """Where a warm step's time goes: the host's time to issue it (no sync) against the
        GPU's busy time (kernels, copies), and the kernel table (profile-<row>.txt)."""
        device = self.device
        batches = [b.to(device) for b in measure.FirstBatches(state["train"], steps)]
        issue = []
        for batch in batches:
            measure.sync(device)
            start = time.perf_counter()
            self.train_step(state, batch)  # returns once queued, unless something syncs
            issue.append(time.perf_counter() - start)
        if device.type == "cuda":
            steps_left = iter(batches)
            busy_ms, ops, events = measure.gpu_busy(
                lambda: self.train_step(state, next(steps_left)), device, len(batches)
            )
        else:
            busy_ms = ops = None
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for batch in batches:
                    self.train_step(state, batch)
            events = prof.key_averages()
        row["profile"] = {
            "host_issue_ms": 1e3 * statistics.median(issue),
            "gpu_busy_ms": busy_ms,
            "gpu_ops_per_step": ops,
        }
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        name = state["variant"].label.replace(":", "-")
        report.write_text_atomic(
            self.out_dir / f"profile-{name}.txt", events.table(sort_by=sort, row_limit=40)
        )
        self.log(f"{state['variant'].label}: profile {row['profile']}")

    def measure_epoch(self, state: dict, row: dict) -> None:
        """A warm epoch through ProjectTrainer._train_epoch: RecBole's loader, .to(device),
        forward, backward, Adam, its loss.item() and NaN check, as in a real run."""
        train, trainer = state["train"], state["trainer"]
        n_batches = len(train)
        cap = self.args.epoch_steps or self.work.epoch_steps
        per_step = row.get("step_ms", 0) / 1e3 + self.result["meta"]["loader"]["ms_per_batch"] / 1e3
        share = self.share() / self.args.repeat
        if per_step * n_batches > share:  # would not fit: fewer batches, extrapolated
            cap = min(cap or n_batches, max(3, int(share / max(per_step, 1e-6))))
        loader = train if not cap or cap >= n_batches else measure.FirstBatches(train, cap)

        def loss_func(interaction):  # the trainer's autocast is off; ours picks bf16 or not
            return self.loss(state, interaction)

        seconds = []
        for epoch in range(self.args.repeat):
            _, s = measure.wall(
                lambda epoch=epoch: trainer._train_epoch(loader, epoch + 1, loss_func=loss_func),
                self.device,
            )
            seconds.append(s * n_batches / len(loader))
        row.update(
            epoch_s=statistics.median(seconds),
            epoch_s_repeats=seconds,
            epoch_s_spread=measure.relative_spread(seconds),
            epoch_steps=len(loader),
            epoch_batches=n_batches,
            epoch_estimated=len(loader) < n_batches,
        )
        self.log(f"{state['variant'].label}: warm epoch {row['epoch_s']:.1f} s "
                 f"({len(loader)}/{n_batches} batches)")  # fmt: skip

    def measure_eval(self, state: dict, row: dict) -> None:
        """Full ranking of every user (valid split) through ProjectTrainer.evaluate; the
        first pass compiles the inference shapes and is reported apart."""

        def evaluate():
            with self.amp(state):
                return state["trainer"].evaluate(state["valid"], load_best_model=False)

        _, cold = measure.wall(evaluate, self.device)
        warm = [measure.wall(evaluate, self.device)[1] for _ in range(self.args.repeat)]
        row.update(
            eval_s=statistics.median(warm),
            eval_s_repeats=warm,
            eval_first_pass_s=cold,
            eval_compile_extra_s=max(0.0, cold - min(warm)),
            eval_users=len(state["valid"].dataset),
        )
        self.update_first_epoch(row)
        self.log(f"{state['variant'].label}: full-ranking eval {row['eval_s']:.2f} s")

    def measure_latency(self, state: dict, row: dict) -> None:
        """One user's history (the longest in the test split), k = the largest topk: through
        the single-history API users call, `pipeline.inference.Recommender.recommend` (raw
        item ids in, (id, score) pairs out; its CUDA graph on CUDA), and as the model's
        eager full_sort_predict + top-k on a batch of 1 (`latency_eager_ms`)."""
        model, config, device = state["model"], state["config"], self.device
        batch = next(iter(state["test"]))[0]
        longest = int(torch.argmax(batch[model.ITEM_SEQ_LEN]))
        user = batch[longest : longest + 1]
        k = max(config["topk"])
        model.eval()

        def eager():
            with torch.no_grad(), self.amp(state):
                scores = model.full_sort_predict(user.to(device)).view(1, -1)
                return torch.topk(scores, k).indices.cpu()

        eager_ms, first = self.time_latency(eager)
        length = int(user[model.ITEM_SEQ_LEN][0])
        tokens = state["trainer"].item_tokens  # raw item ids, as a checkpoint stores them
        items = [tokens[i] for i in user[model.ITEM_SEQ][0, :length].tolist()]
        time_field = config["TIME_FIELD"] + config["LIST_SUFFIX"]
        times = user[time_field][0, :length].tolist() if time_field in user.interaction else None
        row.update(latency_eager_ms=eager_ms, latency_first_call_s=first,
                   latency_history_length=length)  # fmt: skip
        start = time.perf_counter()
        try:
            with self.amp(state):  # a bf16 row's graph is captured under its autocast
                served = Recommender(model, config, tokens)
        except InferenceError as err:  # e.g. a per-user embedding: the eager path only
            row.update(latency_ms=eager_ms, latency_path=f"full_sort_predict ({err})")
            return
        row["latency_setup_s"] = time.perf_counter() - start

        def recommend():
            with self.amp(state):
                return served.recommend(items, times, k=k)

        row["latency_ms"], _ = self.time_latency(recommend)
        row["latency_path"] = "Recommender" + (" (CUDA graph)" if served.cuda_graph else "")

    def time_latency(self, call) -> tuple[dict, float]:
        """(summary of `call`'s wall-clock ms after 5 warm-up calls, its first call's s)."""
        _, first = measure.wall(call, self.device)
        for _ in range(5):
            call()
        times = []
        for _ in range(self.args.repeat):
            for _ in range(self.work.latency_calls):
                times.append(measure.wall(call, self.device)[1])
        stats = measure.summary(times)
        return {key: (1e3 * v if key != "n" else v) for key, v in stats.items()}, first

    @staticmethod
    def update_first_epoch(row: dict) -> None:
        parts = [row.get("train_compile_extra_s"), row.get("eval_compile_extra_s")]
        row["first_epoch_extra_s"] = sum(p for p in parts if p is not None)

    @staticmethod
    def finish_row(state: dict, row: dict) -> None:
        if not row["errors"]:
            row["status"] = "ok"
        else:
            row["status"] = "partial" if "step_ms" in row else "error"

    def cleanup(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def parse_set(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark",
        description="Speed and memory of TiM4Rec and its peers; one Markdown table, full JSON.",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if present")
    parser.add_argument(
        "--models",
        help="comma list, e.g. TiM4Rec,SASRec or TiM4Rec:triton:bf16; 'all' (default on cuda) "
        "or 'core' (TiM4Rec, SSD4Rec, SASRec, Mamba4Rec; default on cpu)",
    )
    parser.add_argument("--workload", choices=("ml-1m", "cpu", "smoke", "amazon-beauty"),
                        help="default: ml-1m on cuda, cpu on cpu")  # fmt: skip
    parser.add_argument("--data-path", default=str(REPO_ROOT / "dataset"),
                        help="folder for the generated synthetic log (default dataset/)")  # fmt: skip
    parser.add_argument("--data-file", help="amazon-beauty: the .inter or .inter.xz to use")
    parser.add_argument("--out", help="output folder (default results/benchmark-<time>/)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, warm epoch capped at 100 batches (extrapolated)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeat every timed measurement N times and report the spread")  # fmt: skip
    parser.add_argument("--epoch-steps", type=int, help="cap the warm epoch at N batches")
    parser.add_argument("--time-budget", type=float,
                        help="seconds; past it, remaining rows are skipped and warm epochs capped "
                        "(default 420 on cuda, 600 on cpu; 0: none)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true",
                        help="profile 5 warm steps per row: host issue time, GPU busy time, "
                        "kernel table in profile-<row>.txt")  # fmt: skip
    parser.add_argument("--set", type=parse_set, action="append", metavar="KEY=VALUE",
                        help="config override for every model, e.g. --set reproducibility=False")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda: no CUDA device here; use --device cpu")
        if args.repeat < 1:
            raise BenchmarkError("--repeat must be >= 1")
        if args.threads is not None:
            if args.threads < 1:
                raise BenchmarkError("--threads must be >= 1")
            torch.set_num_threads(args.threads)
        if args.time_budget is None:
            args.time_budget = 420.0 if device.type == "cuda" else 600.0
        args.data_path = str(Path(args.data_path).expanduser().resolve())  # before chdir
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(Path(args.out or REPO_ROOT / "results" / f"benchmark-{stamp}").resolve())
        work = make_workload(args.workload or ("ml-1m" if device.type == "cuda" else "cpu"),
                             args.quick, args.data_file)  # fmt: skip
        variants = parse_models(args.models, device)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    os.chdir(REPO_ROOT)  # RecBole's log_tensorboard/ and relative paths live at the root
    bench = Benchmark(args, work, device)
    try:
        return run_rows(bench, variants)
    finally:
        bench.cleanup()  # the temporary checkpoint directory, whatever happened


def run_rows(bench: Benchmark, variants: list[Variant]) -> int:
    """Generate the data if synthetic, measure every row, write and print the table; the
    exit status."""
    args, work = bench.args, bench.work
    # as run.py does (pipeline/host_memory.py), once for every row alike
    keep_memory = bench.overrides.get("keep_host_memory", True) is not False
    bench.result["environment"]["host_memory_kept"] = keep_memory and keep_freed_memory()
    if work.spec is not None:
        data_path = Path(args.data_path)
        _, gen_s = measure.wall(lambda: ensure_dataset(work.spec, data_path), torch.device("cpu"))
        bench.overrides.setdefault("data_path", str(data_path))
        bench.result["meta"]["synthetic"] = {
            "spec": work.spec.__dict__,
            "generate_or_cache_s": gen_s,
        }
    bench.log(f"{len(variants)} rows: {', '.join(v.label for v in variants)}; out: {args.out}")
    interrupted = False

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still write and print the table
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_term)
    try:
        bench.floors()
        for i, variant in enumerate(variants):
            bench.run_variant(variant, rows_left=len(variants) - i)
            bench.flush()
    except KeyboardInterrupt:
        interrupted = True
        bench.result["meta"]["notes"].append("interrupted (Ctrl-C or SIGTERM): partial results")
        for row in bench.result["rows"]:
            if row["status"] == "running":
                row["status"] = "interrupted"
                row["errors"]["run"] = "interrupted during this row"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bench.result["meta"]["finished"] = datetime.now().isoformat(timespec="seconds")
        bench.flush()
    print(report.markdown_table(bench.result), end="")
    print(f"\nfull results: {bench.out_dir / 'benchmark.json'}", file=sys.stderr)
    if interrupted:
        return 130
    return 0 if any(r.get("status") in ("ok", "partial") for r in bench.result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
