"""Data-parallel training on several processes (GPUs, or CPU cores with gloo), via torchrun.

    torchrun --standalone --nproc_per_node=2 run.py --config config/config4beauty_64d.yaml

The same run.py, test.py and baseline/<Model>/run.py run unchanged: the pipeline sees
torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group (NCCL on CUDA, gloo on
CPU). docs/distributed.md is the user's guide; the design, in short:

- Same training as one process. `train_batch_size` stays the global batch: every rank builds
  RecBole's loader with the same seed, so all ranks draw the same shuffled global batches,
  and each rank computes its contiguous share of each one. Each share's mean loss is
  weighted by (its size x world size / global batch size), so DDP's gradient average is
  the gradient of the mean loss over the global batch, also for a short last batch. The
  learning rate is unchanged. RecBole's own DDP path (DistributedSampler, per-rank batch
  `train_batch_size / world`, padding by repeated samples) is not used.
- DistributedDataParallel sees every step: RecBole trainers call `model.calculate_loss`,
  not `forward`, so the model is wrapped in `LossModule`, whose forward is the training
  loss, and DDP wraps that. `static_graph=True` because TiM4Rec's last layer has a time
  gate whose output no loss uses: DDP then learns the unused parameters in the first step
  and leaves their gradients None, as one process does (Adam and weight decay skip them).
- Evaluation is exact: each rank scores a contiguous block of whole evaluation batches
  (the batches one process would build), rank 0 gathers the collector's per-user rows in
  batch order and computes the metrics, and broadcasts them. Every rank gets the same
  valid score, so early stopping and "best so far" agree everywhere (no rank leaves the
  loop alone, no hang); the metrics are the single-process ones over all users once.
- Rank 0 alone writes checkpoints and logs at INFO; the best model is loaded by rank 0
  and broadcast, so hosts need no shared disk for training.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from recbole.evaluator import Collector, Evaluator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.trainer import ProjectTrainer, SyncFreeTrainer, new_run_id

# RecBole's own multi-process keys: they start its NCCL-over-TCP path inside Config().
RECBOLE_DDP_KEYS = ("local_rank", "nproc", "world_size", "offset", "ip", "port")
# Collector entries that hold one row per evaluated user (filled batch by batch).
ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as torchrun's environment variables say."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # processes in all
    local_rank: int  # rank on this host: the GPU index
    local_world_size: int  # processes on this host


def launch_env() -> LaunchEnv | None:
    """torchrun's environment, or None for a single process (also `--nproc_per_node=1`)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        env = LaunchEnv(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
        )
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"WORLD_SIZE is set but the distributed environment is incomplete ({err}): "
            "start several processes with torchrun, which sets RANK, WORLD_SIZE and "
            "LOCAL_RANK (docs/distributed.md), or unset WORLD_SIZE for one process"
        ) from None
    return env if env.world_size > 1 else None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that prints, logs and writes."""
    return rank() == 0


def init_from_env(overrides: dict) -> dict:
    """Join torchrun's process group (once per process); return the overrides to build with.

    Runs before RecBole's Config, which sets CUDA_VISIBLE_DEVICES to `gpu_id` (default '0')
    and would leave every rank one GPU, the same one. Under torchrun every rank sees the
    GPUs the launch made visible and uses the one of its LOCAL_RANK; `--gpu_id=2,3` picks
    others, as CUDA_VISIBLE_DEVICES=2,3 does.
    """
    given = sorted(set(overrides) & set(RECBOLE_DDP_KEYS))
    if given:
        raise ConfigError(
            f"{', '.join('--' + k for k in given)}: RecBole's own multi-process settings are "
            "not used here; start several processes with torchrun instead, e.g. "
            "`torchrun --standalone --nproc_per_node=2 run.py ...` (docs/distributed.md)"
        )
    env = launch_env()
    if env is None:
        return overrides
    overrides = dict(overrides)
    gpu_id = overrides.get("gpu_id")
    if isinstance(gpu_id, (tuple, list)):  # `--gpu_id=2,3` parses as a tuple
        gpu_id = ",".join(map(str, gpu_id))
    if gpu_id is not None and str(gpu_id) != "":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_id)  # before CUDA starts
    use_cuda = str(gpu_id) != "" and torch.cuda.is_available()
    if use_cuda:
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise ConfigError(
                f"torchrun started {env.local_world_size} processes on this host but only "
                f"{visible} GPU(s) are visible: use --nproc_per_node={visible} or make more "
                "GPUs visible (CUDA_VISIBLE_DEVICES, --gpu_id)"
            )
        # NVLink multicast (NVLS) can take the GPUs of a shared host out of service; NCCL's
        # ring and tree algorithms are as fast at these gradient sizes.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(env.local_rank)
        overrides["gpu_id"] = os.environ.get(
            "CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible)))
        )
    else:
        overrides["gpu_id"] = ""  # RecBole: an empty gpu_id means the CPU
    if not dist.is_initialized():
        if use_cuda:
            device = torch.device("cuda", env.local_rank)
            dist.init_process_group("nccl", init_method="env://", device_id=device)
        else:
            dist.init_process_group("gloo", init_method="env://")
        atexit.register(shutdown)
    return overrides


def adapt_config(config) -> None:
    """Give a freshly built Config this rank's device, seed offset and quiet logging."""
    if not is_distributed():
        return
    env = launch_env()
    config["single_spec"] = True  # keep RecBole's loaders and trainer on their 1-process path
    # prepare_run seeds with seed + local_rank: with the global rank, rank 0 is seeded as a
    # single process and every other rank differently (its own dropout masks).
    config["local_rank"] = env.rank
    config["world_size"] = env.world_size
    config["nproc"] = env.local_world_size
    config["offset"] = env.rank - env.local_rank
    if dist.get_backend() == "nccl":
        config["device"] = torch.device("cuda", env.local_rank)
    elif config["device"].type != "cpu":
        raise ConfigError(
            "the process group uses gloo (CPU) but the config asks for a GPU; run on CUDA "
            "with NCCL, or set --gpu_id= (empty) for CPU processes"
        )
    if env.rank != 0:  # one log on the console: rank 0's (others log errors only)
        config["state"] = "error"
        config["show_progress"] = False


def make_trainer(config, model, dataset) -> ProjectTrainer:
    """The trainer for this process: DistributedTrainer under torchrun, else ProjectTrainer."""
    cls = DistributedTrainer if is_distributed() else ProjectTrainer
    return cls(config, model, dataset)


def shutdown() -> None:
    """Leave the process group (registered with atexit when joining; `finish` on success)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP's reducer and the last collectives' tensors, freed while Python runs
        dist.destroy_process_group()


def finish() -> None:
    """End a run that succeeded on this rank: with gloo wait for every rank, then leave.

    Without the barrier a rank that exits right after its last collective can reach the
    interpreter's shutdown while a gloo worker thread still holds that collective's
    tensors; freeing them then aborts the process ("terminate called without an active
    exception", seen in CI on rank 1, which exits first). NCCL runs leave as before
    (verified on 2 GPUs). A run that fails leaves through atexit's `shutdown`, with no
    barrier: the other ranks may never reach one.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.barrier()
    shutdown()


# --- splitting batches across ranks -------------------------------------------------------


# A batch that carries this field (pipeline/sequence_batches.py under torchrun) is already
# this rank's share, and the field holds its step weight (see step_weights).
STEP_WEIGHT = "step_weight"


def share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items; the first n % world get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def global_batch_sizes(n_samples: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """The sizes of the batches a BatchSampler makes of n_samples."""
    full, rest = divmod(n_samples, batch_size)
    return [batch_size] * full + ([rest] if rest and not drop_last else [])


def step_weights(sizes: list[int], rank: int, world_size: int) -> list[float]:
    """Per step: the factor on this rank's mean loss that makes DDP's gradient average
    (sum over ranks / world_size) the gradient of the mean over the global batch.

    A rank whose share is empty (a last batch smaller than the world) computes one sample
    with weight 0, so that it still joins the gradient all-reduce.
    """
    weights = []
    for n in sizes:
        start, stop = share(n, rank, world_size)
        weights.append((stop - start) * world_size / n)
    return weights


class RankShardBatches:
    """Training batches: this rank's contiguous share of each global batch of `inner`."""

    def __init__(self, inner, rank: int, world_size: int) -> None:
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:  # the same global batch on every rank (same generator)
            start, stop = share(len(batch), self.rank, self.world_size)
            yield list(batch[start:stop]) if stop > start else list(batch[:1])

    def __len__(self) -> int:
        return len(self.inner)

    def weights(self) -> list[float]:
        sizes = global_batch_sizes(
            len(self.inner.sampler), self.inner.batch_size, self.inner.drop_last
        )
        return step_weights(sizes, self.rank, self.world_size)


class RankBlockBatches:
    """Evaluation batches: a contiguous block of the batches of `inner`, kept whole, so every
    user is scored in the batch one process would score it in, and concatenating the ranks'
    rows in rank order gives the single-process order."""

    def __init__(self, inner, rank: int, world_size: int) -> None:
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def _block(self) -> list:
        batches = list(self.inner)
        start, stop = share(len(batches), self.rank, self.world_size)
        return batches[start:stop]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._block())

    def __len__(self) -> int:
        # Rank 0's block, the largest, on every rank: RecBole's evaluate returns at once for
        # an empty loader, and a rank without batches must still join the gathering.
        start, stop = share(len(self.inner), 0, self.world_size)
        return stop - start


def shard_loader(loader, kind: type) -> RankShardBatches | RankBlockBatches:
    """Make `loader` (a RecBole dataloader) yield this rank's index batches; idempotent.

    Replacing the batch sampler keeps the loader's own iteration (its generator draws, its
    collate_fn, its workers) exactly as in one process.
    """
    current = loader.batch_sampler
    if isinstance(current, (RankShardBatches, RankBlockBatches)):
        return current
    if not isinstance(current, torch.utils.data.BatchSampler):
        raise TypeError(f"cannot split {type(loader).__name__}: it has no BatchSampler")
    wrapped = kind(current, dist.get_rank(), dist.get_world_size())
    # DataLoader refuses to set batch_sampler after __init__; nothing else reads it.
    object.__setattr__(loader, "batch_sampler", wrapped)
    return wrapped


# --- collectives ------------------------------------------------------------------------


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src`, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's module, in place."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def all_reduce_mean(value, device: torch.device):
    """The mean over ranks of a float or a tuple of floats (an epoch's loss)."""
    values = value if isinstance(value, tuple) else (value,)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    mean = (tensor / dist.get_world_size()).tolist()
    return tuple(mean) if isinstance(value, tuple) else mean[0]


class GatheringCollector(Collector):
    """RecBole's Collector whose data struct, on rank 0, holds every rank's user rows in
    rank order (the single-process order, see RankBlockBatches)."""

    def get_data_struct(self):
        struct = super().get_data_struct()
        local = {key: struct[key] for key in ROW_KEYS if key in struct}
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if gathered is not None:
            for key in ROW_KEYS:
                parts = [part[key] for part in gathered if key in part]
                if parts:
                    struct[key] = torch.cat(parts, dim=0)
        return struct


class RankZeroEvaluator(Evaluator):
    """Metrics computed once, on rank 0's gathered rows, and sent to every rank: all ranks
    see bit-identical scores, so their early-stopping decisions cannot differ."""

    def evaluate(self, dataobject):
        result = super().evaluate(dataobject) if dist.get_rank() == 0 else None
        return broadcast_object(result)


# --- the trainer ------------------------------------------------------------------------


class LossModule(nn.Module):
    """forward() = the model's training loss, so that DDP's forward sees every step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, interaction):
        return self.model.calculate_loss(interaction)


class _NoTensorboard:
    """Stands in for rank > 0's SummaryWriter: one event log per run, rank 0's."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _DataParallelLoop(SyncFreeTrainer):
    """The training loop (SyncFreeTrainer's) over this rank's share of each global batch,
    the gradient averaged by DDP. Sits between ProjectTrainer and SyncFreeTrainer in the
    MRO, so that ProjectTrainer's history and checkpoints see the all-rank loss."""

    rank: int
    ddp_model: DistributedDataParallel
    # from ProjectTrainer, which this class is always mixed with (DistributedTrainer)
    precision_autocast: Callable[[], contextlib.AbstractContextManager]
    training_loss: Callable

    def fit(
        self,
        train_data,
        valid_data=None,
        verbose=True,
        saved=True,
        show_progress=False,
        callback_fn=None,
    ):
        # ProjectTrainer restored a checkpoint's random state (rank 0's) on every rank just
        # before: give the other ranks their own dropout streams again.
        if self.rank != 0:
            reseed_for_rank(self.rank)
        return super().fit(
            train_data,
            valid_data,
            verbose=verbose,
            saved=saved,
            show_progress=show_progress,
            callback_fn=callback_fn,
        )

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        # ProjectTrainer passes its training_loss (the model's loss in the configured
        # precision); here that loss runs through DDP's forward instead.
        if loss_func is not None and loss_func != self.training_loss:
            raise NotImplementedError("distributed training uses the model's calculate_loss")
        # The device loader cuts its own shares and puts each step's weight in the batch.
        shards_itself = getattr(train_data, "shards_steps", False)
        weights = (
            None if shards_itself else iter(shard_loader(train_data, RankShardBatches).weights())
        )

        def weighted_loss(interaction):
            with self.precision_autocast():
                losses = self.ddp_model(interaction)
            weight = interaction[STEP_WEIGHT] if weights is None else next(weights)
            if isinstance(losses, tuple):
                return tuple(loss * weight for loss in losses)
            return losses * weight

        total = super()._train_epoch(
            train_data, epoch_idx, loss_func=weighted_loss, show_progress=show_progress
        )
        # Sum over ranks of the weighted shares / world = the sum of global-batch mean losses.
        return all_reduce_mean(total, self.device)


def reseed_for_rank(rank_: int) -> None:
    """Derive this rank's Python, numpy and torch (CPU and CUDA) seeds from its torch state."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) + rank_
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DistributedTrainer(ProjectTrainer, _DataParallelLoop):
    """ProjectTrainer on one rank of a torchrun job (see the module docstring)."""

    def __init__(self, config, model, dataset) -> None:
        if not is_distributed():
            raise RuntimeError("DistributedTrainer needs an initialised process group")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # One run name on all ranks: rank 0 writes the checkpoints the others may read.
        config["run_id"] = broadcast_object(config["run_id"] or new_run_id())
        super().__init__(config, model, dataset)
        self.eval_collector = GatheringCollector(config)
        self.evaluator = RankZeroEvaluator(config)
        device = config["device"]
        self.ddp_model = DistributedDataParallel(  # broadcasts rank 0's initial weights
            LossModule(self.model),
            device_ids=[device.index] if device.type == "cuda" else None,
            static_graph=True,
        )
        if self.rank != 0:
            self.tensorboard.close()
            self.tensorboard = _NoTensorboard()

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if self.rank == 0:
            super()._save_checkpoint(epoch, verbose=verbose, **kwargs)

    def _save_last(self, epoch: int) -> None:
        if self.rank == 0:
            super()._save_last(epoch)

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            self._load_on_rank0(model_file or self.saved_model_file)
        shard_loader(eval_data, RankBlockBatches)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def _load_on_rank0(self, path) -> None:
        """Rank 0 reads and checks the checkpoint, every rank gets its weights: other hosts
        need no copy of the file. A refused checkpoint stops every rank with the same error."""
        error = None
        if self.rank == 0:
            try:
                self.load_model_state(path)
            except Exception as err:
                broadcast_object((isinstance(err, CheckpointError), str(err)))
                raise
        error = broadcast_object(error)  # rank 0 got here: it loaded the file
        if error is not None:
            is_checkpoint_error, message = error
            raise (CheckpointError if is_checkpoint_error else RuntimeError)(
                f"rank 0 could not load {path}: {message}"
            )
        broadcast_module(self.model)
        self.logger.info(f"Loading model structure and parameters from {path}")
