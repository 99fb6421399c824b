"""Data-parallel training on 1 and N GPUs in one invocation: throughput, where the time
goes, and (with --beauty) the test metrics of full Amazon Beauty trainings.

    python -m benchmarks.ddp_throughput                        # ML-1M shape, 1 then 2 GPUs
    python -m benchmarks.ddp_throughput --gpus 1,2,4 --steps 40
    python -m benchmarks.ddp_throughput --beauty               # train + test Beauty, 1 and 2 GPUs
    python -m benchmarks.ddp_throughput --device cpu --workload smoke   # functional check (gloo)

For each process count it starts `torchrun --standalone --nproc_per_node=N` on this
module (N=1 is the ordinary single-process path), builds TiM4Rec through the project's
pipeline (pipeline.runner.prepare_run, DistributedTrainer) at the paper's ML-1M settings
(B=2048 global, L=200, d=64) on benchmarks/synthetic.py's ML-1M-shaped log, and measures:

- step: one training step (zero_grad, DDP forward = loss, backward with the gradient
  all-reduce, Adam) on real batches prefetched to the GPU: CUDA events, median;
- no-sync step: the same inside DDP's no_sync() (no all-reduce): the compute alone;
- all-reduce: one all_reduce of a float32 buffer the size of all gradients;
- loader: RecBole building this rank's share of a batch on the CPU, plus the copy;
- epoch: a whole epoch through the trainer's own loop (data loading, the per-step
  loss.item() sync), the number a user sees.

samples/s = global batch / step time (steps) or training samples / epoch time (epoch).
docs/distributed.md explains the columns. Results: JSON and the table in --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.synthetic import ML1M, SyntheticSpec, ensure_dataset
from pipeline.config import REPO_ROOT

MOVIE_CONFIG = REPO_ROOT / "config" / "config4movie_64d.yaml"
BEAUTY_CONFIG = REPO_ROOT / "config" / "config4beauty_64d.yaml"
SMOKE = SyntheticSpec(
    "ml-1m-synthetic-smoke", n_users=40, n_items=120, n_interactions=1600, max_length=80
)


@dataclass(frozen=True)
class Workload:
    spec: SyntheticSpec
    config_files: list[Path] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    warmup: int = 5  # untimed steps: CUDA context, Triton compilation and autotuning
    steps: int = 30  # timed steps per variant
    prefetch: int = 8  # real batches on the device, cycled


WORKLOADS = {
    "ml-1m": Workload(
        ML1M,
        [MOVIE_CONFIG],
        {"MAX_ITEM_LIST_LENGTH": 200, "train_batch_size": 2048, "eval_batch_size": 4096},
    ),
    "smoke": Workload(
        SMOKE,
        [],
        {
            "MAX_ITEM_LIST_LENGTH": 20,
            "train_batch_size": 64,
            "eval_batch_size": 64,
            "hidden_size": 16,
            "d_state": 16,
            "head_dim": 16,
        },  # fmt: skip
        warmup=1,
        steps=3,
        prefetch=2,
    ),
}


def parse_set(text: str) -> tuple[str, object]:
    from pipeline.config import parse_value

    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ddp_throughput", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--gpus", default="1,2", help="process counts to compare (default 1,2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="TiM4Rec", help="a registry name (default TiM4Rec)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                        help="ml-1m (default on cuda) or smoke (default on cpu)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="timed steps per variant")
    parser.add_argument("--epoch-steps", type=int, default=0,
                        help="cap the timed epoch at N global batches (0: whole epoch)")  # fmt: skip
    parser.add_argument("--beauty", action="store_true",
                        help="train + test Amazon Beauty (config4beauty_64d) instead")  # fmt: skip
    parser.add_argument("--seeds", default="2020", help="--beauty: comma list of seeds")
    parser.add_argument("--epochs", type=int, help="--beauty: cap on epochs (default: config)")
    parser.add_argument("--data-path", default=str(REPO_ROOT / "dataset"),
                        help="folder holding <dataset>/ (synthetic logs are written here)")  # fmt: skip
    parser.add_argument("--data-file", help="--beauty: amazon-beauty.inter(.xz) to read")
    parser.add_argument("--set", action="append", type=parse_set, default=[],
                        metavar="KEY=VALUE", help="a config override for every run")  # fmt: skip
    parser.add_argument("--out", help="result folder (default results/ddp-<time>/)")
    parser.add_argument("--timeout", type=int, default=0, help="seconds per launch (0: none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON path: run as one rank
    return parser


# --- the launcher -----------------------------------------------------------------------


def launch(args: argparse.Namespace, nproc: int, result: Path, extra: list[str]) -> dict:
    """Run this module under torchrun with `nproc` processes; return rank 0's JSON."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "benchmarks.ddp_throughput",
        "--worker", str(result), *extra,
    ]  # fmt: skip
    path = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))  # keep the caller's packages
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast: see docs/distributed.md
    # The same CPU threads per process for every count (torchrun would set 1 for N > 1).
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = result.with_suffix(".log")
    print(f"[{datetime.now():%H:%M:%S}] {nproc} process(es): log {log}", file=sys.stderr)
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=out,
                                  timeout=args.timeout or None)  # fmt: skip
            failed = done.returncode != 0
        except subprocess.TimeoutExpired:
            failed = True
    if failed or not result.is_file():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"the {nproc}-process run failed (log {log}):\n{tail}")
    return json.loads(result.read_text())


def forwarded(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, as command-line arguments."""
    extra = ["--device", args.device, "--model", args.model, "--data-path", args.data_path]
    extra += ["--workload", args.workload, "--epoch-steps", str(args.epoch_steps)]
    if args.steps:
        extra += ["--steps", str(args.steps)]
    if args.beauty:
        extra += ["--beauty"] + (["--epochs", str(args.epochs)] if args.epochs else [])
    for key, value in args.set:
        extra += ["--set", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"]
    return extra


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.workload = args.workload or ("ml-1m" if args.device == "cuda" else "smoke")
    if args.worker:
        return worker(args)
    counts = [int(n) for n in args.gpus.split(",")]
    args.threads = max(1, (os.cpu_count() or 1) // max(counts))
    if args.device == "cuda":
        have = torch.cuda.device_count()
        if have < max(counts):
            raise SystemExit(
                f"--gpus {args.gpus} needs {max(counts)} GPUs, {have} visible; "
                "use --gpus 1 or --device cpu"
            )
    out = Path(args.out or REPO_ROOT / "results" / f"ddp-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    if args.beauty:
        args.data_path = str(beauty_data_path(args.data_file))
        runs = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            for n in counts:
                extra = forwarded(args) + ["--set", f"seed={seed}"]
                runs[(n, seed)] = launch(args, n, out / f"beauty-{n}proc-seed{seed}.json", extra)
        text = beauty_table(runs, args)
    else:
        ensure_dataset(WORKLOADS[args.workload].spec, args.data_path)  # once, before the ranks
        runs = {
            n: launch(args, n, out / f"throughput-{n}proc.json", forwarded(args)) for n in counts
        }
        text = throughput_table(runs, args)
    (out / "ddp.md").write_text(text + "\n")
    print(text)
    return 0


def beauty_data_path(data_file: str | None) -> Path:
    from benchmarks.benchmark import locate_beauty  # decompresses the shared copy if needed

    return locate_beauty(data_file)


# --- one rank ---------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    from pipeline import distributed

    if args.beauty:
        result = beauty_worker(args)
    else:  # nothing is saved: RecBole's trainer only needs a directory to exist
        with tempfile.TemporaryDirectory(prefix="ddp-bench-") as checkpoint_dir:
            result = throughput_worker(args, checkpoint_dir)
    if distributed.is_main_process():
        Path(args.worker).write_text(json.dumps(result, indent=1, default=str))
    distributed.finish()
    return 0


def base_overrides(args: argparse.Namespace, checkpoint_dir: str) -> dict:
    overrides = {"data_path": args.data_path, "checkpoint_dir": checkpoint_dir,
                 "show_progress": False}  # fmt: skip
    if args.device == "cpu":
        overrides["gpu_id"] = ""  # RecBole's spelling of "the CPU"; gloo between ranks
    return overrides


def beauty_worker(args: argparse.Namespace) -> dict:
    from pipeline import distributed
    from pipeline.runner import train

    overrides = base_overrides(args, str(Path(args.worker).parent / "checkpoints"))
    if args.epochs:
        overrides["epochs"] = args.epochs
    overrides.update(dict(args.set))
    result = train(args.model, [BEAUTY_CONFIG], overrides)
    world = torch.distributed.get_world_size() if distributed.is_distributed() else 1
    return {**result, "world_size": world, "seed": overrides.get("seed"),
            "epochs_run": len(result["epoch_seconds"])}  # fmt: skip


def throughput_worker(args: argparse.Namespace, checkpoint_dir: str) -> dict:
    from pipeline import distributed
    from pipeline.distributed import RankShardBatches, shard_loader
    from pipeline.runner import prepare_run

    work = WORKLOADS[args.workload]
    overrides = {**base_overrides(args, checkpoint_dir), "epochs": 1,
                 "dataset": work.spec.name, **work.overrides, **dict(args.set)}  # fmt: skip
    loaded_at = time.perf_counter()
    config, dataset, (train, _, _), model = prepare_run(args.model, work.config_files, overrides)
    load_s = time.perf_counter() - loaded_at
    trainer = distributed.make_trainer(config, model, dataset)
    trainer._saving = False  # no "-last" checkpoint after the timed epoch
    device = config["device"]
    world = torch.distributed.get_world_size() if distributed.is_distributed() else 1
    n_samples = len(train.batch_sampler.sampler)  # training samples of one epoch, all ranks
    if world > 1:
        shard_loader(train, RankShardBatches)
    global_batch = config["train_batch_size"]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # RecBole's loader: this rank's share of a batch, built on the CPU and copied over.
    batches = []
    next(iter(train)).to(device)  # not timed: the first iterator, CUDA context

    def load() -> None:
        for batch in itertools.islice(iter(train), work.prefetch):
            batches.append(batch.to(device))

    _, loader_s = measure.wall(load, device)
    cycle = itertools.cycle(batches)
    loss_of = trainer.ddp_model if world > 1 else model.calculate_loss

    def step() -> None:
        trainer.optimizer.zero_grad()
        loss_of(next(cycle)).backward()  # full batches: every rank's weight is 1
        trainer.optimizer.step()

    model.train()
    for _ in range(work.warmup):
        step()
    n_steps = args.steps or work.steps
    step_s = measure.time_calls(step, device, n_steps)
    row = {
        "processes": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "global_batch": global_batch,
        "per_rank_batch": len(batches[0]),
        "params": n_params,
        "data_load_s": load_s,
        "loader_ms": 1e3 * loader_s / work.prefetch,
        "step_ms": 1e3 * statistics.median(step_s),
        "step_ms_all": [1e3 * s for s in step_s],
    }
    row["samples_per_s"] = global_batch / (row["step_ms"] / 1e3)
    if world > 1:
        with trainer.ddp_model.no_sync():  # the same step without the gradient all-reduce
            nosync_s = measure.time_calls(step, device, n_steps)
        row["nosync_step_ms"] = 1e3 * statistics.median(nosync_s)
        flat = torch.zeros(n_params, dtype=torch.float32, device=device)
        torch.distributed.all_reduce(flat)
        reduce_s = measure.time_calls(lambda: torch.distributed.all_reduce(flat), device, 20)
        row["allreduce_ms"] = 1e3 * statistics.median(reduce_s)
        row["allreduce_mb"] = 4 * n_params / 2**20
        broadcast_rank0_weights(trainer)  # no_sync steps let the ranks drift apart

    # A whole epoch (or the first --epoch-steps batches) through the trainer's own loop.
    n_batches = len(train)
    loader = train if not args.epoch_steps else Capped(train, args.epoch_steps)
    n_timed = len(loader)
    _, epoch_s = measure.wall(lambda: trainer._train_epoch(loader, 0), device)
    timed_samples = n_samples if n_timed == n_batches else n_timed * global_batch
    row.update({
        "epoch_batches": n_batches,
        "epoch_batches_timed": n_timed,
        "epoch_s": epoch_s * n_batches / n_timed,  # extrapolated when capped
        "epoch_capped": n_timed < n_batches,
        "epoch_samples_per_s": timed_samples / epoch_s,
        "epoch_ms_per_step": 1e3 * epoch_s / n_timed,
    })  # fmt: skip
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


class Capped:
    """The first n batches of a RecBole loader; `batch_sampler` stays visible, so the
    distributed trainer finds the loader's rank split."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, min(n, len(loader))
        self.batch_sampler = loader.batch_sampler
        self.shuffle = getattr(loader, "shuffle", False)

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return self.n


def broadcast_rank0_weights(trainer) -> None:
    from pipeline.distributed import broadcast_module

    broadcast_module(trainer.model)


# --- tables -----------------------------------------------------------------------------


def throughput_table(runs: dict[int, dict], args: argparse.Namespace) -> str:
    base = runs[min(runs)]
    first = next(iter(runs.values()))
    lines = [
        f"## {args.model} data-parallel throughput, workload {args.workload}: "
        f"global batch {first['global_batch']}, {first['params']:,} parameters, "
        f"device {first['device']}",
        "",
        "| processes | step ms | samples/s (steps) | speedup | no-sync step ms | "
        "all-reduce ms (MB) | loader ms/batch | epoch s | samples/s (epoch) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in sorted(runs.items()):
        reduce = (f"{row['allreduce_ms']:.2f} ({row['allreduce_mb']:.1f})"
                  if "allreduce_ms" in row else "-")  # fmt: skip
        nosync = f"{row['nosync_step_ms']:.1f}" if "nosync_step_ms" in row else "-"
        capped = "~" if row["epoch_capped"] else ""
        lines.append(
            f"| {n} | {row['step_ms']:.1f} | {row['samples_per_s']:,.0f} | "
            f"{row['samples_per_s'] / base['samples_per_s']:.2f}x | {nosync} | {reduce} | "
            f"{row['loader_ms']:.1f} | {capped}{row['epoch_s']:.1f} | "
            f"{row['epoch_samples_per_s']:,.0f} | "
            f"{row['epoch_samples_per_s'] / base['epoch_samples_per_s']:.2f}x |"
        )
    lines.append("")
    for n, row in sorted(runs.items()):
        if "nosync_step_ms" not in row:
            continue
        exposed = row["step_ms"] - row["nosync_step_ms"]
        overhead = row["epoch_ms_per_step"] - row["step_ms"]
        lines.append(
            f"- {n} processes, where a step goes: compute {row['nosync_step_ms']:.1f} ms "
            f"(perfect scaling: {base['step_ms'] / n:.1f} ms = the 1-process step / {n}), "
            f"exposed gradient all-reduce {exposed:.1f} ms (a bare all-reduce of the "
            f"{row['allreduce_mb']:.1f} MB of gradients: {row['allreduce_ms']:.2f} ms); the "
            f"epoch loop adds {overhead:.1f} ms per step (RecBole's loader "
            f"{row['loader_ms']:.1f} ms per share, per-step loss.item() sync); 1 process: "
            f"{base['epoch_ms_per_step'] - base['step_ms']:.1f} ms, loader {base['loader_ms']:.1f} ms"
        )
    return "\n".join(lines)


def beauty_table(runs: dict[tuple[int, int], dict], args: argparse.Namespace) -> str:
    columns = sorted(runs)
    header = " | ".join(f"{n} proc, seed {seed}" for n, seed in columns)
    lines = [
        f"## {args.model} on Amazon Beauty (config4beauty_64d), full-ranking test metrics",
        "",
        f"| metric | {header} |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for key in runs[columns[0]]["test"]:
        cells = " | ".join(f"{runs[c]['test'][key]:.4f}" for c in columns)
        lines.append(f"| {key} | {cells} |")
    for label, key, fmt in (
        ("best valid NDCG@10", "best_valid_score", "{:.4f}"),
        ("epochs run", "epochs_run", "{}"),
        ("train s", "train_seconds", "{:.0f}"),
    ):
        cells = " | ".join(fmt.format(runs[c][key]) for c in columns)
        lines.append(f"| {label} | {cells} |")
    per_epoch = " | ".join(
        f"{runs[c]['train_seconds'] / max(1, runs[c]['epochs_run']):.1f}" for c in columns
    )
    lines.append(f"| s / epoch (with validation) | {per_epoch} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
