"""Reproduce a paper table: several models x seeds on one dataset, runs in parallel, one report.

    python -m benchmarks.reproduce --dataset amazon-beauty \\
        --tim4rec-config config/config4beauty_64d.yaml \\
        --models TiM4Rec,TiM4Rec:corrected,SSD4Rec,SASRec,Mamba4Rec --seeds 2020,2021,2022 \\
        --parallel 9 [--gpus 0,1,2,3] --out results/beauty

TiM4Rec variants and SSD4Rec use `--tim4rec-config` (SSD4Rec = the same settings without
the time path); other models use `baseline/<Model>/config.yaml` with `--dataset`. Each run
is `pipeline.runner.train` in its own process, with its own checkpoint folder. A run still
going at `--deadline` seconds gets SIGINT, tests its best checkpoint so far on the test
split, and is marked as cut in the report. With `--gpus`, each run starts on the listed
GPU that has the fewest runs at that moment (`--parallel` counts runs on all of them).
Writes runs.json, report.md and valid_ndcg.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.registry import SSD_MODELS
from pipeline.sequence_batches import ALL_POSITIONS, CAUSAL_TIME

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # ../shared/TIM4REC_SPEC.md: TiM4Rec 64d on Amazon Beauty
    "amazon-beauty": {
        "hit@10": 0.0854,
        "ndcg@10": 0.0446,
        "mrr@10": 0.0321,
        "hit@20": 0.1204,
        "ndcg@20": 0.0533,
        "hit@50": 0.1800,
        "ndcg@50": 0.0651,
    },
}
METRICS = [
    "hit@10",
    "ndcg@10",
    "mrr@10",
    "hit@20",
    "ndcg@20",
    "mrr@20",
    "hit@50",
    "ndcg@50",
    "mrr@50",
]


# `Model:variant[:variant]` names: the settings each variant adds to the run's config.
VARIANTS = {
    "corrected": {"time_encoding": "corrected"},
    "causal": CAUSAL_TIME,
    "all": ALL_POSITIONS,
    "device": {"train_loader": "device"},
    "bf16": {"precision": "bf16"},
    "graph": {"train_cuda_graph": True},  # with all or device: steps replayed as CUDA graphs
}


def variant_overrides(name: str) -> dict:
    """`TiM4Rec:all:bf16` -> the config settings of its variants (ValueError if unknown)."""
    overrides = {}
    for variant in name.split(":")[1:]:
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown variant {variant!r} in {name!r}; choose from {', '.join(VARIANTS)}"
            )
        overrides.update(VARIANTS[variant])
    return overrides


def run_spec(name: str, seed: int, args) -> dict:
    model = name.partition(":")[0]
    overrides = {"seed": seed, "show_progress": False, "dataset": args.dataset, **args.overrides}
    overrides.update(variant_overrides(name))
    if model in SSD_MODELS:
        files = [str(Path(args.tim4rec_config).resolve())]
    else:
        files = [str(REPO_ROOT / "baseline" / model / "config.yaml")]
    if args.epochs:
        overrides["epochs"] = args.epochs
    tag = f"{name.replace(':', '-')}-s{seed}"
    overrides["checkpoint_dir"] = str(Path(args.out).resolve() / "saved" / tag)
    return {
        "name": name,
        "model": model,
        "seed": seed,
        "files": files,
        "overrides": overrides,
        "tag": tag,
    }


def worker(spec_path: str) -> None:
    from pipeline.runner import restore_ctrl_c, test_stopped_run, train
    from pipeline.trainer import TrainingInterrupted

    restore_ctrl_c()  # the deadline's SIGINT must reach us even when launched with nohup
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = train(spec["model"], [Path(f) for f in spec["files"]], spec["overrides"])
    except TrainingInterrupted as stop:  # the deadline (SIGINT): test the best model so far
        result = test_stopped_run(stop)
    except KeyboardInterrupt:  # before the first epoch ended: nothing to test
        result = None
    Path(spec_path).with_suffix(".result.json").write_text(json.dumps(result))


def launch(
    specs: list[dict],
    parallel: int,
    deadline: float,
    out: Path,
    grace: float = 120,
    gpus: list[str] | None = None,
) -> list[dict]:
    pending, running, done = list(specs), [], []
    start = time.time()
    while pending or running:
        while pending and len(running) < parallel:
            spec = pending.pop(0)
            env = None
            if gpus:  # the least busy GPU; RecBole's Config reads gpu_id
                load = {g: sum(1 for r in running if r[0].get("gpu") == g) for g in gpus}
                spec["gpu"] = min(gpus, key=lambda g: load[g])
                spec["overrides"]["gpu_id"] = spec["gpu"]
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": spec["gpu"]}
            spec_path = out / "runs" / f"{spec['tag']}.json"
            spec_path.parent.mkdir(parents=True, exist_ok=True)
            spec_path.write_text(json.dumps(spec))
            log = open(out / "runs" / f"{spec['tag']}.log", "w")
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.reproduce", "--worker", str(spec_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
            running.append((spec, spec_path, proc, log))
            where = f" on GPU {spec['gpu']}" if gpus else ""
            print(f"[{time.time() - start:6.0f}s] started {spec['tag']}{where}", flush=True)
        time.sleep(2)
        over = deadline and time.time() - start > deadline
        if over:
            pending.clear()
            for _, _, proc, _ in running:  # each worker tests its best checkpoint, then exits
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for _, _, proc, _ in running:
                try:
                    proc.wait(timeout=max(5.0, grace - (time.time() - start - deadline)))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for item in list(running):
            spec, spec_path, proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            result_path = spec_path.with_suffix(".result.json")
            result = json.loads(result_path.read_text()) if result_path.exists() else None
            done.append({**spec, "result": result})
            state = "stopped" if result and result.get("stopped_at_deadline") else "finished"
            print(
                f"[{time.time() - start:6.0f}s] {state} {spec['tag']}"
                f" ndcg@10={result['test']['ndcg@10'] if result else 'n/a'}",
                flush=True,
            )
    return done


def summarize(runs: list[dict], dataset: str) -> str:
    names = list(dict.fromkeys(r["name"] for r in runs))
    header = (
        "| model | seeds | epochs | s/epoch | "
        + " | ".join(m.upper().replace("HIT", "HR") for m in METRICS)
        + " |"
    )
    lines = [header, "|---" * (len(METRICS) + 4) + "|"]
    paper = PAPER.get(dataset)
    if paper:
        cells = [f"{paper[m]:.4f}" if m in paper else "-" for m in METRICS]
        lines.append("| TiM4Rec (paper) | - | - | - | " + " | ".join(cells) + " |")
    for name in names:
        results = [r["result"] for r in runs if r["name"] == name and r["result"]]
        if not results:
            lines.append(f"| {name} | 0 | - | - | " + " | ".join("-" for _ in METRICS) + " |")
            continue
        cells = []
        for m in METRICS:
            values = [r["test"][m] for r in results]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {sd:.4f}")
        epochs = [len(r.get("epoch_seconds", [])) for r in results]
        warm = [s for r in results for s in r.get("epoch_seconds", [])[1:]]
        per_epoch = f"{statistics.median(warm):.2f}" if warm else "-"
        stopped = sum(1 for r in results if r.get("stopped_at_deadline"))
        mark = f" ({stopped} cut at deadline)" if stopped else ""
        lines.append(
            f"| {name}{mark} | {len(results)} | {min(epochs)}-{max(epochs)} | {per_epoch} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["name"] for r in runs):
        curves = [r["result"]["valid_curve"] for r in runs if r["name"] == name and r["result"]]
        for i, curve in enumerate(curves):
            ax.plot(
                range(len(curve)),
                curve,
                color=f"C{list(dict.fromkeys(x['name'] for x in runs)).index(name)}",
                alpha=0.8,
                label=name if i == 0 else None,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--tim4rec-config", default="config/config4beauty_64d.yaml")
    parser.add_argument("--models", default="TiM4Rec,TiM4Rec:corrected,SSD4Rec,SASRec,Mamba4Rec")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (they share the GPU)")
    parser.add_argument("--epochs", type=int, default=0, help="cap on epochs (0: the config's)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds; then stop and report")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids to spread runs over")
    parser.add_argument("--out", default="results/reproduce")
    parser.add_argument(
        "--report-from",
        nargs="+",
        type=Path,
        metavar="RUNS_JSON",
        help="train nothing: merge these runs.json files (e.g. of runs split over machines) "
        "into one report in --out",
    )
    args, rest = parser.parse_known_args()
    if args.report_from:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        runs = [run for path in args.report_from for run in json.loads(path.read_text())]
        order = {name: i for i, name in enumerate(args.models.split(","))}
        runs.sort(key=lambda r: (order.get(r["name"], len(order)), r["seed"]))
        write_report(runs, args.dataset, out)
        return
    from pipeline.config import parse_args

    args.overrides = parse_args(rest).overrides
    try:
        specs = [
            run_spec(name, int(seed), args)
            for seed in args.seeds.split(",")
            for name in args.models.split(",")
        ]
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    runs = launch(specs, args.parallel, args.deadline, out, gpus=gpus)
    write_report(runs, args.dataset, out)


def write_report(runs: list[dict], dataset: str, out: Path) -> None:
    """runs.json, report.md (the table) and valid_ndcg.png in `out`; print the table."""
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    table = summarize(runs, dataset)
    (out / "report.md").write_text(table + "\n")
    plot(runs, out / "valid_ndcg.png")
    print(table)


if __name__ == "__main__":
    main()
