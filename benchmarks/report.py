"""The benchmark's outputs: environment header, the Markdown table, atomic JSON."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions and settings that a timing depends on."""
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU: {cpu_name()}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "mamba_ssm": _version("mamba-ssm") or _version("mamba_ssm"),
        "recbole": _version("recbole"),
        "numpy": _version("numpy"),
        "pandas": _version("pandas"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = props.total_memory / 2**30
        info["gpu_sm_count"] = props.multi_processor_count
    return info


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file + rename: a kill never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=str, allow_nan=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fmt(value, digits: int = 1, thousands: bool = False) -> str:
    """A number for the table; '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if thousands:
        return f"{value:,.0f}"
    if abs(value) >= 100 and digits > 0:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


COLUMNS = (
    "model",
    "SSD backend",
    "precision",
    "step ms",
    "samples/s",
    "warm epoch s",
    "1st-epoch extra s",
    "peak alloc / reserved GiB",
    "full-rank eval s",
    "1-user ms median / p99",
    "floor ms",
    "step / floor",
)


STAGE_COLUMNS = {"steps": 3, "epoch": 5, "eval": 8, "latency": 9}  # stage -> its column


def row_cells(row: dict, repeat: int) -> list[str]:
    """One table row; a failed or skipped variant says why in its first free cell."""
    mode = {"device": " (device loader)", "all": " (all positions)",
            "graph": " (all positions, CUDA graphs)"}.get(row.get("mode") or "", "")  # fmt: skip
    backend = row.get("backend") or "-"
    if row.get("ssd_kernel"):  # a row that names the Triton backend's SSD scan
        backend += f" ({row['ssd_kernel']} scan)"
    cells = [row["model"] + mode, backend, row["precision"]]
    step = row.get("step_ms")
    spread = row.get("step_ms_spread")
    step_text = fmt(step, 2 if step is not None and step < 10 else 1)
    if repeat > 1 and spread is not None:
        step_text += f" (±{100 * spread / 2:.1f}%)"
    epoch = row.get("epoch_s")
    epoch_text = fmt(epoch, 2 if epoch is not None and epoch < 10 else 1)
    if epoch is not None and row.get("epoch_estimated"):
        epoch_text = f"~{epoch_text}"
    elif repeat > 1 and row.get("epoch_s_spread") is not None:
        epoch_text += f" (±{100 * row['epoch_s_spread'] / 2:.1f}%)"
    memory = row.get("peak_memory_gib")
    memory_text = f"{memory['allocated']:.2f} / {memory['reserved']:.2f}" if memory else "- (CPU)"
    latency = row.get("latency_ms") or {}
    latency_text = (
        f"{fmt(latency.get('median'), 2)} / {fmt(latency.get('p99'), 2)}" if latency else "-"
    )
    floor = row.get("floor") or {}
    cells += [
        step_text,
        fmt(row.get("samples_per_s"), 0, thousands=True),
        epoch_text,
        fmt(row.get("first_epoch_extra_s"), 1),
        memory_text,
        fmt(row.get("eval_s"), 2),
        latency_text,
        fmt(floor.get("floor_ms"), 2),
        fmt(row.get("step_over_floor"), 1),
    ]
    errors = row.get("errors") or {}
    for stage, column in STAGE_COLUMNS.items():  # a stage that failed or was skipped says so
        if stage in errors and cells[column] == "-":
            cells[column] = "skipped" if errors[stage].startswith("skipped") else "failed"
    problems = [f"{stage}: {msg}" for stage, msg in errors.items()]
    if row.get("status") in ("error", "skipped", "unavailable", "interrupted") and problems:
        note = _cell("; ".join(problems))[:160]
        first_free = next((i for i in range(3, len(cells)) if cells[i] in ("-", "- (CPU)")), 3)
        cells[first_free] = f"{row['status']}: {note}"
    return [_cell(c) for c in cells]


def markdown_table(result: dict) -> str:
    """The header lines, then one Markdown table (the last thing printed)."""
    env, meta = result["environment"], result["meta"]
    repeat = meta.get("repeat", 1)
    versions = ", ".join(
        f"{name} {env.get(key) or 'absent'}"
        for name, key in (
            ("torch", "torch"),
            ("triton", "triton"),
            ("mamba-ssm", "mamba_ssm"),
            ("recbole", "recbole"),
            ("CUDA", "cuda"),
        )
    )
    workload = meta.get("workload_description", "")
    lines = [
        f"### Benchmark on {env['device_name']}",
        "",
        f"{versions}; float32 matmul precision '{env['float32_matmul_precision']}'; "
        f"{env['torch_threads']} torch threads"
        f"{'; freed host memory kept' if env.get('host_memory_kept') else ''}; "
        f"{meta.get('started', '')}",
        "",
        f"Workload: {workload}",
    ]
    loader = meta.get("loader")
    if loader:
        lines.append(
            f"RecBole data loading alone: {loader['ms_per_batch']:.1f} ms per batch, "
            f"~{loader['epoch_s']:.1f} s per epoch; dataset build {meta.get('data_load_s', 0):.1f} s."
        )
    for precision, floor in (result.get("floor") or {}).items():
        text = (
            f"Floor, TiM4Rec training step ({precision}): {floor['training_flops'] / 1e9:.1f} GFLOP, "
            f"{floor['training_bytes'] / 1e6:.0f} MB"
        )
        if "floor_ms" in floor:
            text += (
                f" -> {floor['floor_ms']:.2f} ms ({floor['bound']}-bound at "
                f"{floor['peak_flops'] / 1e12:.0f} TFLOP/s {floor['peak_unit']}, "
                f"{floor['bandwidth'] / 1e12:.2f} TB/s)"
            )
            if "products_memory_ms" in floor:  # older JSON files lack it
                text += (
                    f"; its matrix products as separate kernels need >= "
                    f"{floor['products_memory_ms']:.2f} ms of memory traffic alone"
                )
        else:
            text += " (no peak figures for this device: floor time not computed)"
        lines.append(text)
    if meta.get("notes"):
        lines.extend(meta["notes"])
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(row_cells(row, repeat)) + " |")
    return "\n".join(lines) + "\n"
