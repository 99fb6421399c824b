"""The benchmark: synthetic data, the floor model, timing helpers, an end-to-end CPU run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pipeline.trainer as trainer_module
from benchmarks import benchmark, floor, measure, report
from benchmarks.synthetic import ML1M, SyntheticSpec, describe, ensure_dataset, generate
from pipeline.config import build_config
from pipeline.data import load_data
from pipeline.registry import get_model_class
from pipeline.sequence_batches import ALL_POSITIONS, make_train_loader
from tim4rec import POSITION_INDEX

TINY = SyntheticSpec("bench-tiny", n_users=30, n_items=90, n_interactions=1200, max_length=80)


# --- synthetic data ----------------------------------------------------------------------


def test_generator_is_deterministic_from_the_seed():
    first, again = generate(TINY), generate(TINY)
    assert first.equals(again)
    other = generate(dataclasses.replace(TINY, seed=TINY.seed + 1))
    assert not first.equals(other)


def _check_log(frame, spec: SyntheticSpec) -> dict:
    stats = describe(frame)
    assert stats["users"] == spec.n_users
    assert stats["items"] == spec.n_items
    assert stats["interactions"] == spec.n_interactions
    assert stats["length_min"] == spec.min_length
    assert stats["length_max"] == spec.max_length
    assert stats["item_count_min"] >= spec.min_item_count  # survives the 5-core filter
    assert not frame.duplicated(["user_id", "item_id"]).any()  # an item once per user
    steps = frame.groupby("user_id")["timestamp"].diff().dropna()
    assert (steps > 0).all()  # strictly increasing per user
    assert frame["user_id"].is_monotonic_increasing
    return stats


def test_ml1m_shape_statistics():
    frame = generate(ML1M)
    stats = _check_log(frame, ML1M)
    assert 80 <= stats["length_median"] <= 130  # ML-1M: 96
    assert stats["item_count_max"] > 20 * stats["item_count_median"] / 2  # skewed popularity
    gaps = np.diff(frame["timestamp"].to_numpy())[np.diff(frame["user_id"].to_numpy()) == 0]
    assert np.median(gaps) < 3600 < np.percentile(gaps, 99)  # bursts and long breaks


def test_small_spec_and_cache(tmp_path):
    inter = ensure_dataset(TINY, tmp_path)
    assert inter == tmp_path / "bench-tiny" / "bench-tiny.inter"
    assert inter.read_text().splitlines()[0] == "user_id:token\titem_id:token\ttimestamp:float"
    stamp = inter.stat().st_mtime_ns
    assert ensure_dataset(TINY, tmp_path).stat().st_mtime_ns == stamp  # cached
    changed = dataclasses.replace(TINY, seed=7)
    assert ensure_dataset(changed, tmp_path).stat().st_mtime_ns != stamp  # spec changed


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="n_interactions must lie"):
        SyntheticSpec("x", n_users=10, n_items=100, n_interactions=10, max_length=50)
    with pytest.raises(ValueError, match="max_length"):
        SyntheticSpec("x", n_users=10, n_items=30, n_interactions=400, max_length=50)


# --- the floor model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-data")
    ensure_dataset(TINY, folder)
    return folder


def _model(name: str, data_path, **overrides):
    model_class = get_model_class(name)
    config = build_config(
        model_class,
        [],
        {
            "dataset": TINY.name,
            "data_path": str(data_path),
            "MAX_ITEM_LIST_LENGTH": 32,
            "train_batch_size": 8,
            "use_gpu": False,
            "show_progress": False,
            **overrides,
        },
    )
    dataset, train, _, _ = load_data(config)
    torch.manual_seed(0)
    model = model_class(config, train.dataset)
    return config, dataset, train, model


@pytest.mark.parametrize(
    "name, overrides",
    [("TiM4Rec", {}), ("SSD4Rec", {}), ("TiM4Rec", {"p2p_residual": True, "num_layers": 3})],
)
def test_floor_counts_match_the_model(tiny_data, name, overrides):
    config, dataset, train, model = _model(name, tiny_data, **overrides)
    shape = floor.StepShape.from_config(config, dataset.item_num, is_time=model.is_time)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert floor.parameter_count(shape) == n_params

    batch = next(iter(train))
    with FlopCounterMode(display=False) as counter:
        model.calculate_loss(batch).backward()
    counts = counter.get_flop_counts()["Global"]
    by_name = {str(op).split(".")[-1]: n for op, n in counts.items()}
    # torch counts a depthwise convolution's backward as a dense one; use 2 x forward.
    measured = sum(n for op, n in by_name.items() if op != "convolution_backward")
    measured += 2 * by_name.get("convolution", 0)
    analytic = floor.training_flops(shape)
    assert analytic == pytest.approx(measured, rel=0.03)


def test_all_positions_floor_counts_match_the_model(tiny_data):
    config, dataset, train, model = _model(
        "TiM4Rec", tiny_data, train_batch_size=64, **ALL_POSITIONS
    )
    batch = next(iter(make_train_loader(config, train, torch.device("cpu"))))
    windows, targets = len(batch[model.ITEM_SEQ]), len(batch[POSITION_INDEX])
    assert windows < targets  # several targets per window
    shape = dataclasses.replace(
        floor.StepShape.from_config(config, dataset.item_num, windows=windows), targets=targets
    )
    with FlopCounterMode(display=False) as counter:
        model.calculate_loss(batch).backward()
    by_name = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    measured = sum(n for op, n in by_name.items() if op != "convolution_backward")
    measured += 2 * by_name.get("convolution", 0)
    assert floor.training_flops(shape) == pytest.approx(measured, rel=0.03)


def test_floor_is_positive_and_scales_with_batch():
    shape = floor.StepShape(batch=2048, seq_len=200, n_items=3417)
    h100 = floor.device_peaks("NVIDIA H100 80GB HBM3")
    fp32 = floor.floor(shape, "fp32", h100)
    bf16 = floor.floor(shape, "bf16", h100)
    assert 1e11 < fp32["training_flops"] < 1e12  # about 0.38 TFLOP per step
    assert all(v > 0 for v in fp32["bytes"].values())
    assert 0 < bf16["training_bytes"] < fp32["training_bytes"]
    assert 0 < bf16["floor_ms"] < fp32["floor_ms"] < 50
    assert fp32["floor_ms"] == pytest.approx(max(fp32["compute_ms"], fp32["memory_ms"]))

    double = dataclasses.replace(shape, batch=2 * shape.batch)
    assert floor.training_flops(double) == pytest.approx(2 * floor.training_flops(shape))
    one, two = floor.training_bytes(shape), floor.training_bytes(double)
    assert two["parameters_and_adam"] == one["parameters_and_adam"]  # batch-independent
    for key in ("layer_boundaries", "logits", "batch"):
        assert two[key] == pytest.approx(2 * one[key])
    tf32 = floor.floor(shape, "fp32", h100, allow_tf32=True)
    assert tf32["peak_unit"] == "tf32" and tf32["floor_ms"] < fp32["floor_ms"]


def test_device_peaks_and_cpu_floor():
    assert floor.device_peaks("NVIDIA H200")["bandwidth"] == 4.8e12
    assert floor.device_peaks("NVIDIA H100 PCIe")["matched"] == "H100 PCIe"
    assert floor.device_peaks("NVIDIA H100 80GB HBM3")["bandwidth"] == 3.35e12
    assert floor.device_peaks("Some Future GPU") is None
    cpu = floor.floor(floor.StepShape(batch=8, seq_len=16, n_items=50), "fp32", None)
    assert cpu["training_flops"] > 0 and "floor_ms" not in cpu
    with pytest.raises(ValueError, match="precision"):
        floor.floor(floor.StepShape(batch=8, seq_len=16, n_items=50), "fp16", None)


# --- timing helpers and command line -----------------------------------------------------


def test_summary_matches_numpy():
    values = list(np.random.default_rng(0).random(37))
    stats = measure.summary(values)
    assert stats["median"] == pytest.approx(np.median(values))
    assert stats["p99"] == pytest.approx(np.percentile(values, 99))
    assert stats["p10"] == pytest.approx(np.percentile(values, 10))
    assert measure.relative_spread([1.0]) is None
    assert measure.relative_spread([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    assert math.isnan(measure.summary([])["median"])
    with pytest.raises(ValueError, match="precision"):
        measure.autocast(torch.device("cpu"), "fp16")


def test_models_option():
    cpu = torch.device("cpu")
    rows = benchmark.parse_models("all", cpu)
    labels = [v.label for v in rows]
    assert labels[:5] == [
        "TiM4Rec:torch:fp32",
        "TiM4Rec:torch:bf16",
        "SSD4Rec:torch:fp32",
        "SASRec:fp32",
        "Mamba4Rec:torch:fp32",
    ]
    assert len(labels) == len(set(labels))
    assert "TiM4Rec:torch:bf16:all" in labels
    picked = benchmark.parse_models("TiM4Rec:bf16, SASRec:bf16, SSD4Rec:device", cpu)
    assert [v.label for v in picked] == [
        "TiM4Rec:torch:bf16",
        "SASRec:bf16",
        "SSD4Rec:torch:fp32:device",
    ]
    for text, message in [
        ("SASRec:all", "training modes device/all/graph and the SSD scans fused/mamba are for"),
        ("SASRec:mamba", "SSD scans fused/mamba are for"),
        ("Nope", "unknown model"),
        ("TiM4Rec:triton", "not available on cpu"),
        ("SASRec:torch", "torch/triton backends"),
        ("TiM4Rec:fp16", "unknown option"),
    ]:
        with pytest.raises(benchmark.BenchmarkError, match=message):
            benchmark.parse_models(text, cpu)


def test_bad_command_lines_fail_clearly(tmp_path, capsys):
    missing = str(tmp_path / "nothing.inter.xz")
    args = ["--device", "cpu", "--workload", "amazon-beauty", "--data-file", missing]
    assert benchmark.main(args) == 2
    assert "python -m datatools prepare amazon-beauty" in capsys.readouterr().err
    assert benchmark.main(["--device", "cpu", "--models", "Nope"]) == 2
    assert "unknown model 'Nope'" in capsys.readouterr().err


def test_failed_data_generation_leaves_no_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # main() moves to the repository root; restored afterwards
    monkeypatch.setattr(benchmark.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def failing(spec, path):
        raise OSError("disk full")

    monkeypatch.setattr(benchmark, "ensure_dataset", failing)
    args = ["--device", "cpu", "--workload", "smoke", "--out", str(tmp_path / "out")]
    with pytest.raises(OSError, match="disk full"):
        benchmark.main([*args, "--data-path", str(tmp_path / "data")])
    assert list((tmp_path / "tmp").iterdir()) == []


def test_error_row_is_reported_in_the_table():
    row = {"model": "X", "backend": None, "precision": "fp32", "status": "error",
           "errors": {"build": "RuntimeError: boom | bang"}}  # fmt: skip
    cells = report.row_cells(row, repeat=1)
    assert cells[3].startswith("error: build: RuntimeError: boom / bang")
    partial = {"model": "X", "backend": "torch", "precision": "bf16", "status": "partial",
               "step_ms": 12.345, "samples_per_s": 2048 / 0.012345,
               "errors": {"epoch": "OutOfMemoryError: CUDA", "latency": "skipped: time budget"}}  # fmt: skip
    cells = report.row_cells(partial, repeat=1)
    assert cells[3:6] == ["12.3", "165,897", "failed"] and cells[9] == "skipped"


# --- end to end --------------------------------------------------------------------------


def _run(tmp_path, monkeypatch, *extra: str) -> tuple[int, dict, str]:
    monkeypatch.chdir(tmp_path)  # main() moves to the repository root; restored afterwards
    out = tmp_path / "out"
    args = ["--device", "cpu", "--workload", "smoke", "--out", str(out)]
    code = benchmark.main([*args, "--data-path", str(tmp_path / "data"), *extra])
    return (
        code,
        json.loads((out / "benchmark.json").read_text()),
        (out / "benchmark.md").read_text(),
    )


@pytest.mark.slow
def test_cpu_smoke_run_end_to_end(tmp_path, monkeypatch, capsys):
    real = benchmark.get_model_class

    def failing(name):  # one broken model must not lose the other rows
        if name == "GRU4Rec":
            raise RuntimeError("broken on purpose")
        return real(name)

    monkeypatch.setattr(benchmark, "get_model_class", failing)

    def no_saving(*args, **kwargs):  # the timed epoch must not write checkpoints
        raise AssertionError("checkpoint written during the benchmark")

    monkeypatch.setattr(trainer_module, "save_checkpoint", no_saving)
    served = benchmark.Recommender

    def recommender(model, *args, **kwargs):  # a model the users' API refuses: eager latency
        if type(model).__name__ == "SASRec":
            raise benchmark.InferenceError("refused on purpose")
        return served(model, *args, **kwargs)

    monkeypatch.setattr(benchmark, "Recommender", recommender)
    code, result, table = _run(
        tmp_path, monkeypatch, "--models", "TiM4Rec:fp32,GRU4Rec,SASRec", "--threads", "1"
    )
    assert code == 0
    rows = {r["model"]: r for r in result["rows"]}
    assert [r["status"] for r in result["rows"]] == ["ok", "error", "ok"]
    assert "broken on purpose" in rows["GRU4Rec"]["errors"]["build"]
    for name in ("TiM4Rec", "SASRec"):
        row = rows[name]
        assert row["step_ms"] > 0 and row["samples_per_s"] > 0
        assert row["epoch_s"] > 0 and row["epoch_steps"] == 3  # the smoke cap, extrapolated
        assert row["eval_s"] > 0 and row["eval_users"] == 40
        assert 0 < row["latency_ms"]["median"] <= row["latency_ms"]["p99"]
        assert 0 < row["latency_eager_ms"]["median"] <= row["latency_eager_ms"]["p99"]
        assert row["first_epoch_extra_s"] >= 0
    assert rows["TiM4Rec"]["latency_path"] == "Recommender"  # the users' API, eager on CPU
    assert rows["SASRec"]["latency_path"] == "full_sort_predict (refused on purpose)"
    assert rows["SASRec"]["latency_ms"] == rows["SASRec"]["latency_eager_ms"]
    assert rows["TiM4Rec"]["floor"]["training_flops"] > 0  # no GPU peak: FLOPs only
    assert result["floor"]["fp32"]["training_bytes"] > 0
    assert result["meta"]["data"]["users"] == 40
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("| SASRec |")  # the table is printed last
    assert table.strip().splitlines()[-3].startswith("| TiM4Rec | torch | fp32 |")
    assert "error: build: RuntimeError: broken on purpose" in table


def test_errors_without_a_message_are_reported():
    """A stage's error with an empty message (a bare assert) is recorded by its type (its
    formatting used to raise IndexError); otherwise by type and first line."""
    assert benchmark.error_text(AssertionError()) == "AssertionError"
    assert benchmark.error_text(ValueError("bad\nmore")) == "ValueError: bad"


def test_training_mode_rows_run_on_the_device_loader(tmp_path, monkeypatch):
    code, result, table = _run(
        tmp_path, monkeypatch, "--models", "TiM4Rec:fp32:all,SSD4Rec:device", "--threads", "1"
    )
    assert code == 0
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    all_positions, device = result["rows"]
    assert all_positions["mode"] == "all"
    shape = all_positions["floor"]["shape"]  # its own step: fewer windows, B targets scored
    assert shape["targets"] == 32 and 0 < shape["batch"] < 32
    assert all_positions["step_ms"] > 0 and all_positions["epoch_s"] > 0
    assert device["floor"]["training_flops"] > 0
    assert "| TiM4Rec (all positions) | torch | fp32 |" in table
    assert "| SSD4Rec (device loader) | torch | fp32 |" in table


def test_reproduce_variants_set_their_config():
    from benchmarks.reproduce import variant_overrides

    assert variant_overrides("TiM4Rec") == {}
    assert variant_overrides("TiM4Rec:all:bf16") == {
        "train_positions": "all",
        "time_encoding": "causal",
        "p2p_residual": True,
        "precision": "bf16",
    }
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        variant_overrides("TiM4Rec:fast")


def test_time_budget_skips_but_writes(tmp_path, monkeypatch):
    code, result, table = _run(
        tmp_path, monkeypatch, "--models", "TiM4Rec:fp32,SASRec", "--time-budget", "1e-9"
    )
    assert code == 1  # nothing measured
    assert [r["status"] for r in result["rows"]] == ["skipped", "skipped"]
    assert "time budget" in table


def test_floor_components_run_the_products_the_floor_counts():
    """benchmarks/floor_components.py's cuBLAS part: exactly floor.py's matrix-product
    FLOPs, forward and backward (3 x forward)."""
    from benchmarks.floor_components import matrix_products

    shape = floor.StepShape(batch=3, seq_len=20, n_items=50, targets=7, p2p_residual=True)
    step = matrix_products(shape, torch.device("cpu"), torch.float32)
    with FlopCounterMode(display=False) as counter:
        step()
    products = ("in_proj", "out_proj", "ffn", "time_mlp", "time_gate", "scoring")
    counted = floor.forward_flops(shape)
    assert counter.get_total_flops() == 3 * sum(counted[name] for name in products)


def test_product_shapes_are_the_products_the_floor_counts():
    shape = floor.StepShape(batch=5, seq_len=30, n_items=70, targets=9, p2p_residual=True)
    flops: dict[str, int] = {}
    for name, m, k, n in floor.product_shapes(shape):
        flops[name] = flops.get(name, 0) + 2 * m * k * n
    counted = floor.forward_flops(shape)
    assert flops == {name: counted[name] for name in flops}
    assert set(flops) == {"in_proj", "out_proj", "ffn", "time_mlp", "time_gate", "scoring"}
    m, k, n = 9, 64, 70  # scoring: 9 targets x d=64 against 70 items, bf16
    assert (
        floor.separate_products_bytes(
            floor.StepShape(batch=5, seq_len=30, n_items=70, targets=9, num_layers=0), 2
        )
        == 3 * (m * k + k * n + m * n) * 2
    )


def test_linear_products_are_the_blocks_products():
    """benchmarks.linear_products times in_proj, out_proj and the FFN at the widths the
    model builds, and refuses to run without CUDA with one clear message."""
    from benchmarks.linear_products import layer_products, main

    assert layer_products(64) == [
        ("in_proj", 64, 324),
        ("out_proj", 128, 64),
        ("ffn W1", 64, 256),
        ("ffn W2", 256, 64),
    ]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main([])


def test_partial_sums_benchmark_needs_cuda():
    from benchmarks.partial_sums import SHAPES, main

    assert all(len(shape) >= 2 for shape in SHAPES)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main([])


def test_norm_kernels_sweep_leaves_the_shipped_options():
    """benchmarks.norm_kernels: each swept option set applies inside its context and the
    shipped options come back; without CUDA one clear message. The timed calls run in
    Triton's interpreter (forward, then gradients twice)."""
    pytest.importorskip("triton")
    from conftest import run_in_triton_interpreter

    from benchmarks.launch_options import launch_options
    from benchmarks.norm_kernels import NORMS, main, sweep_options

    for module, _ in NORMS.values():
        if module is None:  # PyTorch's ops, no launch options
            continue
        shipped = {name: dict(o) for name, o in module.LAUNCH_OPTIONS.items()}
        quarter = getattr(module, "QUARTER_ELEMENTS", None)
        for norm, options in sweep_options():
            if NORMS[norm][0] is not module:
                continue
            expected = dict(options)
            with launch_options(module, options):
                if "QUARTER_ELEMENTS" in expected:
                    assert module.QUARTER_ELEMENTS == expected.pop("QUARTER_ELEMENTS")
                assert all(module.LAUNCH_OPTIONS[n] == v for n, v in expected.items())
        assert module.LAUNCH_OPTIONS == shipped
        assert getattr(module, "QUARTER_ELEMENTS", None) == quarter
        with pytest.raises(KeyError, match="no launch options"):
            with launch_options(module, {"_no_such_kernel": {}}):
                pass
        assert module.LAUNCH_OPTIONS == shipped
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main([])
    run_in_triton_interpreter(
        "import torch\n"
        "from benchmarks.norm_kernels import NORMS\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for _, calls in NORMS.values():\n"
        "        forward, forward_backward = calls(400, dtype, device='cpu')\n"
        "        y = forward()\n"
        "        assert y.isfinite().all() and (y.shape[0] == 400 or y.shape == (2, 4, 200))\n"
        "        forward_backward(); forward_backward()\n"
        "print('ok')\n"
    )
