"""Latency of scoring one history with `pipeline.inference.Recommender.recommend`.

    python benchmarks/recommend_latency.py [--checkpoint saved/<file>.pth] [--device cpu cuda]

Each call is the whole user-facing path: raw ids -> indices, host -> device copies, the
model's full_sort_predict over every item, top-k, and the k results back on the host. After
`--warmup` calls, `--calls` calls are timed one by one (torch.cuda.synchronize around each
on CUDA) and the median, p99 and mean are printed as a Markdown table. On CUDA both
the eager forward and the CUDA-graph replay (the Recommender's default there) are timed.

Without --checkpoint a randomly initialised model of the paper's size (config defaults:
hidden 64, 2 layers, L = 50) over an Amazon-Beauty-sized catalogue (--n-items) is saved to a
temporary checkpoint; latency does not depend on trained weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.config import build_config  # noqa: E402
from pipeline.inference import CheckpointDataset, Recommender  # noqa: E402
from pipeline.registry import get_model_class  # noqa: E402


def synthetic_checkpoint(model_name: str, n_items: int, length: int, folder: Path) -> Path:
    """A checkpoint of a freshly initialised `model_name`; no dataset needed."""
    config_dict = {"dataset": "synthetic", "MAX_ITEM_LIST_LENGTH": length}
    model_class = get_model_class(model_name)
    config = build_config(model_class, [], config_dict)
    model = model_class(config, CheckpointDataset(config, n_users=2, n_items=n_items))
    path = folder / f"{model_name}-synthetic.pth"
    save_checkpoint(
        path,
        {
            "identity": {
                "model": model_name,
                "dataset": "synthetic",
                "n_users": 2,
                "n_items": n_items,
            },
            "config": config_dict,
            "item_tokens": ["[PAD]"] + [f"item{i}" for i in range(1, n_items)],
            "state_dict": model.state_dict(),
        },
    )
    return path


def time_calls(rec: Recommender, items: list, times: list, k: int, warmup: int, calls: int):
    """Seconds per `recommend` call, one value per timed call."""
    sync = torch.cuda.synchronize if rec.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        rec.recommend(items, times, k=k)
    seconds = []
    for _ in range(calls):
        sync()
        start = time.perf_counter()
        rec.recommend(items, times, k=k)
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def graph_modes(device: str) -> list[bool]:
    """CUDA: eager and CUDA-graph replay, to show what the graph buys; CPU: eager only."""
    return [False, True] if torch.device(device).type == "cuda" else [False]


def backend_of(rec: Recommender) -> str:
    """The SSD implementation the model runs on this device (project SSD models only)."""
    block = next((m for m in rec.model.modules() if hasattr(m, "backend")), None)
    if block is None:
        return "-"
    from models.backend import resolve_backend

    return resolve_backend(block.backend, rec.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a run.py checkpoint (default: a synthetic one)")
    parser.add_argument("--model", default="TiM4Rec", help="model of the synthetic checkpoint")
    parser.add_argument("--n-items", type=int, default=12102, help="synthetic catalogue size")
    parser.add_argument("--length", type=int, default=50, help="MAX_ITEM_LIST_LENGTH (synthetic)")
    parser.add_argument("--device", nargs="+", help="devices to time (default: cpu, and cuda)")
    parser.add_argument("--k", type=int, default=10, help="items returned per call")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls first")
    parser.add_argument("--calls", type=int, default=500, help="timed calls")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    with tempfile.TemporaryDirectory() as folder:
        path = args.checkpoint or synthetic_checkpoint(
            args.model, args.n_items, args.length, Path(folder)
        )
        rows = []
        modes = [(device, graph) for device in devices for graph in graph_modes(device)]
        for device, graph in modes:
            rec = Recommender.from_checkpoint(path, device=device, cuda_graph=graph)
            g = np.random.default_rng(0)
            ids = rec.item_ids
            items = [ids[i] for i in g.integers(0, len(ids), size=rec.max_length)]
            times = (1.6e9 + np.cumsum(g.integers(1, 10**5, size=len(items)))).tolist()
            seconds = time_calls(rec, items, times, args.k, args.warmup, args.calls)
            ms = np.asarray(seconds) * 1e3
            name = torch.cuda.get_device_name(rec.device) if rec.device.type == "cuda" else "cpu"
            rows.append(
                f"| {type(rec.model).__name__} | {name} | {'yes' if graph else 'no'} "
                f"| {backend_of(rec)} | {rec.n_items - 1} "
                f"| {rec.max_length} | {args.k} | {statistics.median(ms):.3f} "
                f"| {np.percentile(ms, 99):.3f} | {ms.mean():.3f} |"
            )
    print(f"one history per call, {args.calls} timed calls after {args.warmup} warm-up calls")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print(
        "| model | device | CUDA graph | SSD backend | items | L | k | median ms | p99 ms | mean ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
