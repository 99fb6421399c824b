"""Distributed training on the CPU: torchrun, gloo, 2 processes, against one process.

The end-to-end test trains TiM4Rec for 2 epochs on 40 users of ml-100k once in a plain
process and once under `torchrun --nproc_per_node=2` (this file is the worker script),
with the same global batch, and checks:

- exact evaluation: the 2-process test.py path scores the 1-process best checkpoint with
  exactly the 1-process metrics (12 decimals), so metrics cover every user once;
- same training: after 2 epochs the weights agree with the 1-process weights up to float
  summation order (each rank sums its half of the batch; DDP adds the halves). Dropout is
  off, because each rank draws its own masks; the batch size leaves a last global batch of
  one sample, so one rank runs its zero-weight stand-in sample;
- both ranks hold identical valid and test results (broadcast), only rank 0 writes
  checkpoints, and the job ends (a timeout turns a hang into a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # run by torchrun as a script: make the repository importable
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.distributed import (  # noqa: E402
    RankBlockBatches,
    RankShardBatches,
    global_batch_sizes,
    share,
    step_weights,
)
from pipeline.sequence_batches import ALL_POSITIONS  # noqa: E402

N_USERS = 40  # 6,236 training samples after the 5-core filter
BATCH = 215  # 6,236 = 29 x 215 + 1: the last global batch holds one sample
TIMEOUT_S = 240  # a hang fails the test instead of the CI job


def run_overrides(data_path: str, checkpoint_dir: str) -> dict:
    return {
        "dataset": "ml-slice",
        "data_path": data_path,
        "checkpoint_dir": checkpoint_dir,
        "MAX_ITEM_LIST_LENGTH": 10,
        "hidden_size": 16,
        "d_state": 16,
        "head_dim": 16,
        "dropout_prob": 0.0,  # each rank draws its own masks: only exact without dropout
        "time_drop_out": 0.0,
        "weight_decay": 0.01,  # would move parameters DDP wrongly gave zero gradients
        "train_batch_size": BATCH,
        "eval_batch_size": 7,  # 41 users: 6 evaluation batches, 3 per rank
        "epochs": 2,
        "metric_decimal_place": 12,  # RecBole rounds metrics to 4 places by default
        "show_progress": False,
    }


# --- unit tests: how batches are split --------------------------------------------------


def test_shares_cover_every_item_once_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            bounds = [share(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_step_weights_make_ddp_average_the_global_mean():
    sizes = global_batch_sizes(n_samples=23, batch_size=5)
    assert sizes == [5, 5, 5, 5, 3]
    assert global_batch_sizes(23, 5, drop_last=True) == [5, 5, 5, 5]
    for world in (2, 3, 4):
        per_rank = [step_weights(sizes, r, world) for r in range(world)]
        for step, n in enumerate(sizes):
            # DDP divides the sum of the ranks' gradients by world: sum of weights must be world,
            # each rank's weight proportional to its share.
            assert sum(w[step] for w in per_rank) == pytest.approx(world)
            for r in range(world):
                start, stop = share(n, r, world)
                assert per_rank[r][step] == pytest.approx((stop - start) * world / n)
    # A share-less rank (last batch of 1 on 2 ranks) gets weight 0.
    assert step_weights([1], 1, 2) == [0.0] and step_weights([1], 0, 2) == [2.0]


def test_rank_batches_partition_a_real_batch_sampler():
    generator = torch.Generator().manual_seed(0)
    data = list(range(23))

    def sampler():
        generator.manual_seed(0)
        random = torch.utils.data.RandomSampler(data, generator=generator)
        return torch.utils.data.BatchSampler(random, batch_size=5, drop_last=False)

    global_batches = list(sampler())
    shards = [list(RankShardBatches(sampler(), r, 3)) for r in range(3)]
    for step, batch in enumerate(global_batches):
        # Rank order reassembles the global batch; an empty share is one stand-in sample.
        real = [
            shards[r][step]
            for r in range(3)
            if share(len(batch), r, 3)[1] > share(len(batch), r, 3)[0]
        ]
        assert sum(real, []) == batch
    assert len(RankShardBatches(sampler(), 1, 3)) == len(global_batches)
    assert RankShardBatches(sampler(), 0, 3).weights() == step_weights([5, 5, 5, 5, 3], 0, 3)

    ordered = torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(data), batch_size=4, drop_last=False
    )
    blocks = [list(RankBlockBatches(ordered, r, 2)) for r in range(2)]
    assert blocks[0] + blocks[1] == list(ordered)  # whole batches, single-process order
    # len() is rank 0's block everywhere: a rank without batches must still evaluate.
    assert [len(RankBlockBatches(ordered, r, 4)) for r in range(4)] == [2, 2, 2, 2]
    assert [len(list(RankBlockBatches(ordered, r, 4))) for r in range(4)] == [2, 2, 1, 1]
    assert list(RankBlockBatches(ordered, 7, 8)) == [] and len(RankBlockBatches(ordered, 7, 8)) == 1


def test_recbole_ddp_keys_are_refused_with_the_torchrun_command():
    from pipeline.config import ConfigError
    from pipeline.distributed import init_from_env

    with pytest.raises(ConfigError, match="torchrun --standalone --nproc_per_node=2"):
        init_from_env({"nproc": 2, "world_size": 2})


def test_finish_leaves_the_process_group_and_is_a_no_op_without_one(tmp_path):
    from pipeline import distributed

    distributed.finish()  # one process, no group: nothing to do
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        distributed.finish()  # barrier (one rank), then destroy
        assert not torch.distributed.is_initialized()
        distributed.finish()  # twice: still nothing to do
    finally:
        distributed.shutdown()


# --- end to end: torchrun, gloo, 2 processes --------------------------------------------


def launch(args: list[str], nproc: int | None) -> subprocess.CompletedProcess:
    """This file as a worker: a plain process (nproc None) or torchrun with nproc ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    try:
        done = subprocess.run(
            [*launcher, __file__, *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"worker hung (> {TIMEOUT_S} s):\n{hung.stderr}"[-4000:])
    assert done.returncode == 0, f"worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from conftest import write_slice

    from pipeline.data import BUNDLED

    root = tmp_path_factory.mktemp("ddp")
    data = write_slice(root / "data", "ml-slice", BUNDLED["ml-100k"] / "ml-100k.inter", N_USERS)
    single, double = root / "single", root / "double"
    launch(["--data", str(data), "--out", str(single)], nproc=None)
    one = json.loads((single / "rank0.json").read_text())
    launch(
        ["--data", str(data), "--out", str(double), "--reference", one["result"]["checkpoint"]],
        nproc=2,
    )
    two = [json.loads((double / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"one": one, "two": two, "single": single, "double": double}


def state_of(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_two_processes_evaluate_a_fixed_model_exactly_as_one(runs):
    reference = runs["one"]["result"]["test"]
    for rank in (0, 1):
        assert runs["two"][rank]["world_size"] == 2
        assert runs["two"][rank]["reevaluated"] == reference  # all 9 metrics, 12 decimals
        # Another batch size may change scores in the last bit, hardly the ranking.
        assert runs["two"][rank]["reevaluated_one_batch"] == pytest.approx(reference, abs=1e-9)


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(runs):
    one = state_of(runs["one"]["result"]["last_checkpoint"])
    two = state_of(runs["two"][0]["result"]["last_checkpoint"])
    assert one["epoch"] == two["epoch"] == 1
    start = state_of(runs["one"]["initial"])
    for name, weight in one["state_dict"].items():
        other = two["state_dict"][name]
        torch.testing.assert_close(other, weight, rtol=1e-4, atol=2e-6, msg=name)
        # The parameters training moved, moved the same way (not merely both small).
        moved = weight - start[name]
        if moved.abs().max() > 1e-4:
            cosine = torch.nn.functional.cosine_similarity(
                (other - start[name]).flatten(), moved.flatten(), dim=0
            )
            assert cosine > 0.9999, name
    # TiM4Rec's last time gate is unused by the loss: untouched in both (no zero gradients).
    unused = [n for n in one["state_dict"] if "layers.1.block.time_gate" in n]
    assert unused
    for name in unused:
        assert torch.equal(two["state_dict"][name], start[name])
    losses_one = [h["train_loss"] for h in one["history"]]
    losses_two = [h["train_loss"] for h in two["history"]]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)


@pytest.mark.slow
def test_ranks_agree_and_only_rank0_writes(runs):
    rank0, rank1 = runs["two"]
    for key in ("best_valid_score", "valid", "test", "checkpoint"):
        assert rank0["result"][key] == rank1["result"][key], key
    assert rank1["saves"] == []
    assert rank0["saves"], "rank 0 wrote no checkpoint"
    files = sorted(p.name for p in (runs["double"] / "saved").iterdir())
    run = Path(rank0["result"]["checkpoint"]).stem
    assert files == [f"{run}-last.pth", f"{run}.pth"]
    # Trained 2-process metrics are those of one process, up to the float differences above.
    for key, value in runs["one"]["result"]["test"].items():
        assert rank0["result"]["test"][key] == pytest.approx(value, abs=0.02), key


@pytest.mark.slow
def test_throughput_benchmark_runs_one_and_two_processes(tmp_path):
    """benchmarks/ddp_throughput.py on the CPU (gloo): what the GPU run will execute."""
    (tmp_path / "tmp").mkdir()  # the ranks' temporary checkpoint directories go here
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(tmp_path / "tmp"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "benchmarks.ddp_throughput", "--device", "cpu",
               "--steps", "2", "--epoch-steps", "3", "--data-path", str(tmp_path / "data"),
               "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| processes | step ms | samples/s (steps) | speedup")
    assert rows[1].startswith("| 1 |") and rows[2].startswith("| 2 |")
    two = json.loads((tmp_path / "out" / "throughput-2proc.json").read_text())
    assert two["processes"] == 2 and two["per_rank_batch"] == two["global_batch"] // 2
    assert two["nosync_step_ms"] > 0 and two["allreduce_ms"] > 0
    assert "where a step goes" in done.stdout
    assert not list((tmp_path / "tmp").glob("ddp-bench-*"))  # removed by each rank


@pytest.mark.slow
@pytest.mark.parametrize("mode", [ALL_POSITIONS, {"train_loader": "device"}])
def test_the_device_loader_on_two_processes_trains_the_same_weights_as_one(tmp_path, mode):
    """The device loader under torchrun: each rank takes its share of every step (for all
    positions, of its windows) and the step weights make the 2-process gradient that of the
    whole step."""
    from conftest import write_slice

    from pipeline.data import BUNDLED

    data = write_slice(tmp_path / "data", "ml-slice", BUNDLED["ml-100k"] / "ml-100k.inter", 12)
    extra = ["--mode", json.dumps(mode)]
    launch(["--data", str(data), "--out", str(tmp_path / "one"), *extra], nproc=None)
    launch(["--data", str(data), "--out", str(tmp_path / "two"), *extra], nproc=2)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())["result"]
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text())["result"] for r in (0, 1)]
    assert two[0]["test"] == two[1]["test"]
    weights_one = state_of(one["last_checkpoint"])["state_dict"]
    weights_two = state_of(two[0]["last_checkpoint"])["state_dict"]
    for name, weight in weights_one.items():
        torch.testing.assert_close(weights_two[name], weight, rtol=1e-4, atol=2e-6, msg=name)
    losses_one = [h["train_loss"] for h in state_of(one["last_checkpoint"])["history"]]
    losses_two = [h["train_loss"] for h in state_of(two[0]["last_checkpoint"])["history"]]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)


@pytest.mark.slow
def test_bf16_precision_trains_on_two_processes(tmp_path):
    """precision: bf16 under torchrun: the loss runs under bf16 autocast through DDP."""
    from conftest import write_slice

    from pipeline.data import BUNDLED

    data = write_slice(tmp_path / "data", "ml-slice", BUNDLED["ml-100k"] / "ml-100k.inter", 12)
    extra = ["--mode", json.dumps({"precision": "bf16"})]
    launch(["--data", str(data), "--out", str(tmp_path / "two"), *extra], nproc=2)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["autocast"] == ["torch.bfloat16"]
    assert ranks[0]["result"]["test"] == ranks[1]["result"]["test"]
    losses = [h["train_loss"] for h in state_of(ranks[0]["result"]["last_checkpoint"])["history"]]
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)


# --- the worker (run by the tests above through torchrun) -------------------------------


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", help="a 1-process best checkpoint to re-evaluate")
    parser.add_argument("--mode", default="{}", help="JSON: extra config (training mode)")
    args = parser.parse_args(argv)

    import pipeline.trainer as trainer_module
    from pipeline import distributed
    from pipeline.runner import evaluate_checkpoint, train
    from tim4rec import TiM4Rec

    saves: list[str] = []
    save = trainer_module.save_checkpoint

    def counting_save(path, payload):  # which rank writes what
        saves.append(str(path))
        return save(path, payload)

    trainer_module.save_checkpoint = counting_save
    initial: dict = {}
    init = trainer_module.ProjectTrainer.__init__

    def keep_initial(self, config, model, dataset):  # the weights before any step
        init(self, config, model, dataset)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer_module.ProjectTrainer.__init__ = keep_initial
    autocast_seen: set[str] = set()
    calculate_loss = TiM4Rec.calculate_loss

    def recording(self, interaction):  # the precision each training loss ran in
        enabled = torch.is_autocast_enabled("cpu")
        autocast_seen.add(str(torch.get_autocast_dtype("cpu")) if enabled else "off")
        return calculate_loss(self, interaction)

    TiM4Rec.calculate_loss = recording
    saved = args.out / "saved"
    result = train("TiM4Rec", [], {**run_overrides(args.data, str(saved)), **json.loads(args.mode)})
    out = {
        "rank": distributed.rank(),
        "world_size": torch.distributed.get_world_size() if distributed.is_distributed() else 1,
        "result": result,
        "saves": saves,
        "autocast": sorted(autocast_seen),
    }
    if distributed.is_main_process():
        # DistributedTrainer has broadcast rank 0's initial weights: these are every rank's.
        out["initial"] = str(args.out / "initial.pth")
        torch.save(initial, out["initial"])
    if args.reference:
        again = evaluate_checkpoint(Path(args.reference), {"show_progress": False})
        out["reevaluated"] = again["test"]
        # One evaluation batch for 2 ranks: rank 1 scores nothing and still takes part.
        whole = {"show_progress": False, "eval_batch_size": 4096}
        out["reevaluated_one_batch"] = evaluate_checkpoint(Path(args.reference), whole)["test"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{out['rank']}.json").write_text(json.dumps(out))
    distributed.finish()  # as run.py and test.py end


if __name__ == "__main__":
    worker(sys.argv[1:])
