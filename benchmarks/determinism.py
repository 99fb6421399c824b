"""Does the same seed give the same run, and what does deterministic mode cost?

    python -m benchmarks.determinism --dataset=ml-100k --epochs=4 [--modes=default,deterministic]
        [--model=TiM4Rec] [--json=out.json] [--key=value ...]

For each mode the script trains twice with the same seed and configuration, each run in a
fresh process (as a user would; cuBLAS reads its workspace setting when it starts), then
prints per mode whether the two runs are identical (losses of every epoch, valid and test
metrics, best weights), the largest weight difference, and the median training time per
epoch from epoch 1 on (epoch 0 compiles and autotunes the Triton kernels).

Modes: `default` is `deterministic: False`; `deterministic` is `deterministic: True`
(pipeline/trainer.py: configure_determinism). Any other `--key=value` goes to every run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/determinism.py`
    sys.path.insert(0, str(REPO_ROOT))

MODES = {"default": False, "deterministic": True}


def worker(model: str, overrides: dict, out: Path) -> None:
    """One training run; writes what the comparison needs to `out` (JSON)."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.runner import train

    result = train(model, [], overrides)
    history = load_checkpoint(result["last_checkpoint"])["history"]
    out.write_text(
        json.dumps(
            {
                "checkpoint": result["checkpoint"],
                "losses": [h["train_loss"] for h in history],
                "epoch_seconds": [h["train_seconds"] for h in history],
                "valid": result["valid"],
                "test": result["test"],
            }
        )
    )


def run_once(model: str, overrides: list[str], deterministic: bool, folder: Path, tag: str) -> dict:
    out = folder / f"{tag}.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.determinism",
        "--worker",
        f"--model={model}",
        f"--json={out}",
        *overrides,
        f"--deterministic={deterministic}",
        f"--checkpoint_dir={folder / tag}",
        "--show_progress=False",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run {tag} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def max_weight_difference(a: str, b: str) -> float:
    from pipeline.checkpoint import load_checkpoint

    first, second = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return max(
        float((first[k].double() - second[k].double()).abs().max()) if first[k].numel() else 0.0
        for k in first
    )


def compare(model: str, overrides: list[str], modes: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="determinism-") as tmp:
        folder = Path(tmp)
        for mode in modes:
            runs = [
                run_once(model, overrides, MODES[mode], folder, f"{mode}-{i}") for i in range(2)
            ]
            later_epochs = [s for run in runs for s in run["epoch_seconds"][1:]]
            rows.append(
                {
                    "mode": mode,
                    "identical": runs[0]["losses"] == runs[1]["losses"]
                    and runs[0]["valid"] == runs[1]["valid"]
                    and runs[0]["test"] == runs[1]["test"],
                    "max_weight_diff": max_weight_difference(
                        runs[0]["checkpoint"], runs[1]["checkpoint"]
                    ),
                    "last_loss": [run["losses"][-1] for run in runs],
                    "test_ndcg@10": [run["test"].get("ndcg@10") for run in runs],
                    "seconds_per_epoch": statistics.median(later_epochs) if later_epochs else None,
                }
            )
    return rows


def environment() -> str:
    import torch

    from pipeline.trainer import mamba_has_deterministic_mode

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"torch {torch.__version__}, {device}, mamba-ssm deterministic backward: "
        f"{mamba_has_deterministic_mode()}"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | identical | max abs weight diff | last loss (run 1 / 2) "
        "| test NDCG@10 (run 1 / 2) | s/epoch (median, epoch >= 1) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_epoch = "n/a" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.3f}"
        lines.append(
            f"| {r['mode']} | {'yes' if r['identical'] else 'NO'} | {r['max_weight_diff']:.3g} "
            f"| {r['last_loss'][0]!r} / {r['last_loss'][1]!r} "
            f"| {r['test_ndcg@10'][0]} / {r['test_ndcg@10'][1]} | {per_epoch} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from pipeline.config import parse_args

    own = {"worker": False, "model": "TiM4Rec", "modes": "default,deterministic", "json": None}
    rest = []
    for item in argv:
        key, _, value = item[2:].partition("=")
        if item == "--worker":
            own["worker"] = True
        elif item.startswith("--") and key in own:
            own[key] = value
        else:
            rest.append(item)
    if own["worker"]:
        worker(own["model"], parse_args(rest).overrides, Path(own["json"]))
        return 0
    modes = own["modes"].split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    rows = compare(own["model"], rest, modes)
    print(environment())
    print(table(rows))
    if own["json"]:
        Path(own["json"]).write_text(json.dumps({"environment": environment(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
