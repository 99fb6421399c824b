"""Compare TiM4Rec with baselines on one dataset: a Markdown table, a JSON file, a chart.

    python compare.py --dataset ml-100k --models TiM4Rec,SASRec,Mamba4Rec [--epochs N]
                      [--tim4rec-config FILE] [--config FILE] [--key=value ...]
                      [--threads N] [--gpus 0,1,2,3] [--model-timeout S] [--out results]

Every model trains through the same pipeline as run.py and baseline/<Model>/run.py
(`pipeline.runner.train`), with its baseline/<Model>/config.yaml (TiM4Rec: its
config/model defaults), then `--tim4rec-config` files for TiM4Rec and SSD4Rec only (a
paper setting such as config/config4beauty_64d.yaml; SSD4Rec ignores its time keys), then
`--config` files and `--key=value` overrides, which apply to every model. TiM4Rec is always included. Each model runs in its own process, so its
peak memory is its own: GPU peak allocated on CUDA, peak resident set size otherwise.
Train seconds per epoch are the mean over the epochs after the first (which pays for
warm-up); with a single epoch that epoch's time is reported and marked. With `--gpus`,
models run at the same time, each alone on one of the listed GPUs (so each model's
seconds are its own GPU's; the GPUs should be of one kind); without it, one after the
other on the default device.

Output: results/<dataset>-<YYYYmmdd-HHMMSS>/{comparison.md, comparison.json, comparison.png},
written to a temporary folder first and renamed when complete.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import queue
import resource
import shlex
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pipeline.config import REPO_ROOT, ConfigError, parse_args
from pipeline.data import DatasetError, resolve_data_path
from pipeline.registry import SSD_MODELS, model_names

REFERENCE_MODEL = "TiM4Rec"
DEFAULT_MODELS = (
    "TiM4Rec",
    "SASRec",
    "BERT4Rec",
    "GRU4Rec",
    "Caser",
    "Mamba4Rec",
    "SSD4Rec",
    "TiSASRec",
    "LRURec",
)
METRICS = (("hit", "Hit"), ("ndcg", "NDCG"), ("mrr", "MRR"))
TOPK = (10, 20, 50)
MIB = 1024 * 1024


class CompareError(ValueError):
    """A comparison that cannot start; the message says how to fix it."""


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_command(argv: list[str]) -> tuple[argparse.Namespace, list[Path], dict]:
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description="Train TiM4Rec and baselines on one dataset and tabulate their results.",
        epilog="Other --key=value arguments override the configuration of every model.",
        allow_abbrev=False,
    )
    parser.add_argument("--dataset", default="ml-100k", help="dataset name (default ml-100k)")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated models; {REFERENCE_MODEL} is always run (default: all)",
    )
    parser.add_argument("--epochs", type=int, help="training epochs of every model")
    parser.add_argument(
        "--tim4rec-config",
        action="append",
        default=[],
        metavar="FILE",
        help="config file for TiM4Rec and SSD4Rec only (e.g. config/config4beauty_64d.yaml)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads per run (default torch's)")
    parser.add_argument(
        "--gpus", help="comma-separated GPU ids: run models in parallel, one per GPU at a time"
    )
    parser.add_argument(
        "--model-timeout",
        type=float,
        metavar="S",
        help="stop a model's training after S seconds and test its best checkpoint so far",
    )
    parser.add_argument("--out", default="results", help="parent folder of the results")
    args, rest = parser.parse_known_args(argv)
    try:
        run_args = parse_args(rest)
    except SystemExit:  # --help inside the pass-through part
        parser.print_help()
        raise
    args.models = select_models(args.models)
    if args.epochs is not None and args.epochs < 1:
        raise CompareError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        raise CompareError(f"--threads must be >= 1, got {args.threads}")
    args.gpus = parse_gpus(args.gpus)
    if args.model_timeout is not None and args.model_timeout <= 0:
        raise CompareError(f"--model-timeout must be > 0 seconds, got {args.model_timeout}")
    args.tim4rec_config = [Path(f).resolve() for f in args.tim4rec_config]
    missing = [str(f) for f in args.tim4rec_config if not f.is_file()]
    if missing:
        raise CompareError(f"--tim4rec-config file not found: {', '.join(missing)}")
    overrides = {**run_args.overrides, "dataset": args.dataset}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return args, run_args.config_files, overrides


def select_models(text: str) -> list[str]:
    """'SASRec,Caser' -> ['TiM4Rec', 'SASRec', 'Caser'], refusing unknown names."""
    known = model_names()
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise CompareError(
            f"unknown model(s) {', '.join(unknown)} in --models; choose from {', '.join(known)}"
        )
    ordered = [REFERENCE_MODEL] + [name for name in chosen if name != REFERENCE_MODEL]
    return list(dict.fromkeys(ordered))


def parse_gpus(text: str | None) -> list[str]:
    """'0,1' -> ['0', '1']; None -> [] (run on the default device, one model at a time)."""
    if text is None:
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise CompareError(f"--gpus takes distinct GPU ids like 0,1,2, got {text!r}")
    return gpus


def model_config_files(model: str, extra: list[Path], tim4rec: list[Path] = ()) -> list[Path]:
    """baseline/<model>/config.yaml (if any), the TiM4Rec setting (SSD models), then `extra`."""
    own = REPO_ROOT / "baseline" / model / "config.yaml"
    paper = list(tim4rec) if model in SSD_MODELS else []
    return ([own] if own.is_file() else []) + paper + list(extra)


def check_dataset(overrides: dict) -> None:
    """Fail before any training when the dataset cannot be found."""
    # As pipeline.config does: an override is relative to here, the default to the repository.
    given = overrides.get("data_path")
    data_path = Path(os.path.abspath(given)) if given else REPO_ROOT / "dataset"
    name = overrides["dataset"]
    resolve_data_path({"dataset": name, "data_path": str(data_path / name)})


# --------------------------------------------------------------------------------------
# One model, in its own process
# --------------------------------------------------------------------------------------


def run_model(
    model: str,
    files: list[Path],
    overrides: dict,
    threads: int | None,
    gpu: str | None = None,
    timeout: float | None = None,
) -> dict:
    """Train `model` in a fresh process (on GPU `gpu` alone, if given); its result or an error.

    After `timeout` seconds the process gets SIGINT, as from Ctrl-C: it stops training and
    tests its best checkpoint so far (the row is marked).
    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    if gpu is not None:  # RecBole's Config sets CUDA_VISIBLE_DEVICES from gpu_id
        overrides = {**overrides, "gpu_id": gpu}
    process = context.Process(
        target=_child, args=(model, files, overrides, threads, messages, gpu), name=model
    )
    start = time.time()
    process.start()
    message, interrupted = None, False
    while message is None:
        try:
            message = messages.get(timeout=2.0)
        except queue.Empty:
            if not process.is_alive():
                break
            if timeout and not interrupted and time.time() - start > timeout:
                os.kill(process.pid, signal.SIGINT)
                interrupted = True
    process.join()
    if message is None:
        message = {"error": f"the {model} process exited with code {process.exitcode}"}
    message["wall_seconds"] = time.time() - start
    return message


def _child(model, files, overrides, threads, messages, gpu) -> None:  # in the spawned process
    if gpu is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    from pipeline.runner import USER_ERRORS, restore_ctrl_c, test_stopped_run, train
    from pipeline.trainer import TrainingInterrupted

    restore_ctrl_c()  # --model-timeout's SIGINT must reach us even when launched with nohup

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        result = train(model, files, overrides)
    except TrainingInterrupted as stop:  # --model-timeout: test the best model so far
        result = test_stopped_run(stop)
        if result is None:
            messages.put({"error": "stopped by --model-timeout before its first epoch ended"})
            return
    except USER_ERRORS as err:
        messages.put({"error": str(err)})
        return
    except Exception as err:  # report and let the other models run
        messages.put({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
        return
    on_gpu = cuda and result["device"].startswith("cuda")
    result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if on_gpu else None
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["threads"] = torch.get_num_threads()
    messages.put(result)


def summarize(model: str, files: list[Path], message: dict) -> dict:
    """The fields the table and chart need, plus everything the run returned."""
    row = {"model": model, "config_files": [str(f) for f in files], **message}
    if "error" in message:
        return row
    epochs = message["epoch_seconds"]
    timed = epochs[1:] if len(epochs) > 1 else epochs
    row["seconds_per_epoch"] = sum(timed) / len(timed) if timed else None
    row["seconds_per_epoch_from"] = "second epoch on" if len(epochs) > 1 else "first epoch only"
    if message["peak_gpu_bytes"] is not None:
        row["peak_memory_bytes"], row["peak_memory_kind"] = message["peak_gpu_bytes"], "GPU"
    else:
        row["peak_memory_bytes"], row["peak_memory_kind"] = message["peak_rss_bytes"], "RSS"
    return row


def row_summary(row: dict) -> str:
    """One line per finished model, so that a log holds the results of a run cut short."""
    if "error" in row:
        return f"failed: {row['error'].splitlines()[0]}"
    seconds = row["seconds_per_epoch"]
    cut = ", stopped by --model-timeout" if row.get("stopped_at_deadline") else ""
    return (
        f"test NDCG@10 {row['test']['ndcg@10']:.4f}, HR@10 {row['test']['hit@10']:.4f}, "
        f"{len(row['epoch_seconds'])} epochs, train "
        + (f"{seconds:.2f} s/epoch" if seconds is not None else "n/a")
        + cut
    )


def run_all(
    models: list[str],
    extra_files: list[Path],
    overrides: dict,
    threads: int | None,
    gpus: list[str],
    tim4rec_files: list[Path] = (),
    timeout: float | None = None,
) -> list[dict]:
    """Every model's row, in the order given: one after the other, or one per free GPU."""

    def one(model: str, gpu: str | None) -> dict:
        files = model_config_files(model, extra_files, tim4rec_files)
        where = f" on GPU {gpu}" if gpu is not None else ""
        print(f"=== {model}{where} ({', '.join(map(str, files)) or 'model defaults'})", flush=True)
        row = summarize(model, files, run_model(model, files, overrides, threads, gpu, timeout))
        print(f"=== {model} done in {row['wall_seconds']:.0f} s: {row_summary(row)}", flush=True)
        return row

    if not gpus:
        return [one(model, None) for model in models]
    free: queue.Queue[str] = queue.Queue()
    for gpu in gpus:
        free.put(gpu)

    def on_free_gpu(model: str) -> dict:
        gpu = free.get()
        try:
            return one(model, gpu)
        finally:
            free.put(gpu)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        return list(pool.map(on_free_gpu, models))


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def markdown_table(rows: list[dict], header: dict) -> str:
    ok = [r for r in rows if "error" not in r]
    keys = [f"{m}@{k}" for k in TOPK for m, _ in METRICS]
    best = {key: max((r["test"][key] for r in ok), default=None) for key in keys}
    lines = [f"# {header['dataset']}: TiM4Rec and baselines", ""]
    lines += [f"- {name}: {value}" for name, value in header["notes"].items()]
    lines.append("")
    titles = [f"{title}@{k}" for k in TOPK for _, title in METRICS]
    columns = ["Model", *titles, "Params", "Train s/epoch", "Epochs", "Peak MiB"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|---" + "|---:" * (len(columns) - 1) + "|")
    for row in rows:
        if "error" in row:
            first_line = row["error"].splitlines()[0]
            lines.append(f"| {row['model']} | failed: {first_line} |" + " |" * (len(columns) - 2))
            continue
        cells = [row["model"]]
        for key in keys:
            value = f"{row['test'][key]:.4f}"
            cells.append(f"**{value}**" if row["test"][key] == best[key] else value)
        seconds = "n/a"  # a resumed run that had no epoch left to train
        if row["seconds_per_epoch"] is not None:
            seconds = f"{row['seconds_per_epoch']:.1f}"
            if row["seconds_per_epoch_from"] == "first epoch only":
                seconds += "*"
        memory = f"{row['peak_memory_bytes'] / MIB:.0f} ({row['peak_memory_kind']})"
        epochs = str(len(row["epoch_seconds"])) + ("†" if row.get("stopped_at_deadline") else "")
        cells += [f"{row['n_params']:,}", seconds, epochs, memory]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Test split, full ranking over all items (leave-one-out). Bold: best per column. "
        "Train s/epoch: mean from the second epoch (* = only one epoch ran). † = stopped by "
        "--model-timeout, best checkpoint so far tested. Peak MiB: GPU peak allocated on CUDA, "
        "else the process's peak resident set size.",
    ]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    names = [r["model"] for r in ok]
    positions = list(range(len(names)))
    width = 0.8 / len(TOPK)
    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(5 * (len(METRICS) + 1), 4.5))
    for ax, (metric, label) in zip(axes, METRICS):
        for i, k in enumerate(TOPK):
            values = [r["test"][f"{metric}@{k}"] for r in ok]
            ax.bar([p + (i - 1) * width for p in positions], values, width, label=f"@{k}")
        ax.set_title(label)
        ax.legend(fontsize=8)
    axes[-1].bar(positions, [r["seconds_per_epoch"] or 0.0 for r in ok], color="gray")
    axes[-1].set_title("train seconds / epoch")
    for ax in axes:
        ax.set_xticks(positions)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_parent: Path, dataset: str, report: dict, rows: list[dict]) -> Path:
    """Write the three files into a temporary folder, then rename it into place."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_parent.mkdir(parents=True, exist_ok=True)
    final = out_parent / f"{dataset}-{stamp}"
    suffix = 1
    while final.exists():
        suffix += 1
        final = out_parent / f"{dataset}-{stamp}-{suffix}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_parent))
    try:
        (staging / "comparison.md").write_text(markdown_table(rows, report))
        (staging / "comparison.json").write_text(json.dumps(report, indent=2, default=str))
        bar_chart(rows, staging / "comparison.png", f"{dataset}: test metrics and speed")
        os.replace(staging, final)
    except BaseException:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
        raise
    return final


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, extra_files, overrides = parse_command(argv)
        check_dataset(overrides)
    except (CompareError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_parent = Path(args.out).resolve()

    rows = run_all(
        args.models,
        extra_files,
        overrides,
        args.threads,
        args.gpus,
        args.tim4rec_config,
        args.model_timeout,
    )

    first_ok = next((r for r in rows if "error" not in r), {})
    report = {
        "dataset": args.dataset,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": {
            "command": "python compare.py " + shlex.join(argv),
            "device": first_ok.get("device", "n/a"),
            "torch threads": first_ok.get("threads", "n/a"),
            "GPUs": (
                f"{', '.join(args.gpus)}: models in parallel, each alone on one GPU"
                if args.gpus
                else "one model at a time"
            ),
            "shared overrides": json.dumps(overrides, default=str),
        },
        "models": rows,
    }
    folder = write_results(out_parent, args.dataset, report, rows)
    print((folder / "comparison.md").read_text())
    print(f"results: {folder}")
    failed = [r["model"] for r in rows if "error" in r]
    if failed:
        print(f"error: {', '.join(failed)} failed; see their rows and the log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
