"""Training batches assembled on the model's device, with RecBole's sample semantics.

RecBole's sequential datasets hold every training sample as a padded row (its
`data_augmentation`: one sample per interaction but a user's first, the history being at
most L items before it), and its loader gathers a batch of rows on the CPU and copies it to
the GPU. Here each user's training sequence is kept once, flat, on the device, and every
sample is the pair (end, length) pointing into it; a batch is one gather on the device.
`SequenceStore` rebuilds that form from RecBole's training split and checks it against
every row RecBole built, so the samples are RecBole's exactly.

Two ways to cut an epoch into steps (`train_positions`):

- ``last``: RecBole's samples, `train_batch_size` per step, reshuffled every epoch.
- ``all``: each user's sequence passed once, a target at every position. The first window
  of a user holds its first min(m, L) samples (position i: history of i + 1 items);
  a sample whose history is cut to the last L items needs its own window (target at the
  last position). For a causal model every sample's loss is the same as in ``last`` mode,
  at a fraction of the sequence work; steps hold about `train_batch_size` targets each.

`train_loader: device` selects this loader for ``last``; ``all`` always uses it. Under
torchrun every rank draws the same order and takes its contiguous share of each step (for
``all``, windows holding about 1/N of the step's targets), with the step weight that makes
DDP's gradient average that of the whole step (pipeline/distributed.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from logging import getLogger

import numpy as np
import torch
from recbole.data.interaction import Interaction

from pipeline import distributed
from pipeline.config import ConfigError
from pipeline.distributed import STEP_WEIGHT, share
from tim4rec import POSITION_INDEX

TRAIN_LOADERS = ("recbole", "device")
TRAIN_POSITIONS = ("last", "all")
# TiM4Rec's causal time path (each position sees only earlier ones), and the settings that
# train on every position: the mode and that time path (SSD4Rec, without one, ignores it).
CAUSAL_TIME = {"time_encoding": "causal", "p2p_residual": True}
ALL_POSITIONS = {"train_positions": "all", **CAUSAL_TIME}
CHECK_ROWS = 65536  # rows compared at a time when checking the rebuilt samples
WINDOW_MULTIPLE = 128  # pad_batches: windows per step rounded up to a multiple of this
IGNORED_LABEL = -100  # target of a padding row: CrossEntropyLoss's default ignore_index


class SequenceStoreError(ValueError):
    """RecBole's training samples are not prefixes of one sequence per user."""


class SequenceStore:
    """Every user's training sequence, flat, and each RecBole training sample as
    (end, length): history flat[end - length : end], target flat[end].

    Built from RecBole's training dataset (rows after `data_augmentation` and the split),
    whose samples of one user are consecutive and in time order: a user with m samples has
    m + 1 items, the first history's first item, then the m targets.
    """

    def __init__(self, dataset, max_length: int) -> None:
        inter = dataset.inter_feat
        self.uid_field = dataset.uid_field
        self.length_field = dataset.item_list_length_field
        self.list_suffix = dataset.config["LIST_SUFFIX"]
        self.max_length = max_length
        self.fields = [f for f in inter.columns if f + self.list_suffix in inter.columns]
        if dataset.iid_field not in self.fields:
            raise SequenceStoreError("the training samples have no item history field")

        uid = inter[self.uid_field].numpy()
        n = len(uid)
        run_start = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])  # (U,) first row per user
        if len(np.unique(uid[run_start])) != len(run_start):
            raise SequenceStoreError("a user's training samples are not consecutive")
        run_of_row = np.repeat(np.arange(len(run_start)), np.diff(np.r_[run_start, n]))
        j = np.arange(n) - run_start[run_of_row]  # index of the sample within its user
        lengths = inter[self.length_field].numpy()
        if not np.array_equal(lengths, np.minimum(j + 1, max_length)):
            raise SequenceStoreError(
                "the history lengths are not those of consecutive prefixes (1, 2, ..., L)"
            )
        self.run_start = run_start
        self.ends = run_start[run_of_row] + run_of_row + 1 + j  # (N,) target's flat index
        self.lengths = lengths.astype(np.int64)
        self.uids = inter[self.uid_field]
        first_of_run = run_start + np.arange(len(run_start))  # flat index of each first item
        self.flat: dict[str, torch.Tensor] = {}
        for field in self.fields:
            values = inter[field]
            flat = values.new_zeros((n + len(run_start),) + tuple(values.shape[1:]))
            flat[torch.from_numpy(self.ends)] = values
            flat[torch.from_numpy(first_of_run)] = inter[field + self.list_suffix][run_start, 0]
            self.flat[field] = flat
        self.check(inter)

    def __len__(self) -> int:
        return len(self.ends)

    def histories(self, field: str, ends: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Padded histories (B, L) of `field` for samples given by (ends, lengths)."""
        flat = self.flat[field]
        positions = torch.arange(self.max_length, device=ends.device)
        index = (ends - lengths)[:, None] + positions  # (B, L)
        real = positions < lengths[:, None]
        values = flat[index.clamp(max=len(flat) - 1)]
        return values.masked_fill(~real.view(real.shape + (1,) * (values.dim() - 2)), 0)

    def check(self, inter) -> None:
        """Every rebuilt history and target equals RecBole's row, or SequenceStoreError."""
        ends, lengths = torch.from_numpy(self.ends), torch.from_numpy(self.lengths)
        for start in range(0, len(self), CHECK_ROWS):
            rows = slice(start, start + CHECK_ROWS)
            for field in self.fields:
                history = self.histories(field, ends[rows], lengths[rows])
                theirs = inter[field + self.list_suffix][rows]
                if not (
                    torch.equal(history, theirs)
                    and torch.equal(self.flat[field][ends[rows]], inter[field][rows])
                ):
                    raise SequenceStoreError(
                        f"the rebuilt '{field}' histories differ from RecBole's training "
                        f"samples (rows {start}..{start + len(history) - 1})"
                    )

    def to(self, device: torch.device) -> SequenceStore:
        self.flat = {k: v.to(device) for k, v in self.flat.items()}
        self.uids = self.uids.to(device)
        return self

    def windows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All-positions windows: (start, length, first target position, uid row) each (W,).

        Window positions p in [first, length) predict flat[start + p + 1], whose history is
        flat[start : start + p + 1], the sample of that target. Every sample is in exactly
        one window.
        """
        counts = np.diff(np.r_[self.run_start, len(self)])  # samples per user
        L = self.max_length
        first_len = np.minimum(counts, L)
        # One window per user, then one per sample past the L-th (history cut to L items).
        long_rows = np.flatnonzero(self.lengths == L)
        long_rows = long_rows[(long_rows - np.repeat(self.run_start, counts)[long_rows]) >= L]
        start = np.r_[self.ends[self.run_start] - 1, self.ends[long_rows] - L]
        length = np.r_[first_len, np.full(len(long_rows), L)]
        first = np.r_[np.zeros(len(counts), dtype=np.int64), np.full(len(long_rows), L - 1)]
        rows = np.r_[self.run_start, long_rows]
        return start, length, first, rows


class DeviceTrainLoader:
    """Iterates RecBole-style training batches (Interaction on `device`) from a SequenceStore.

    Has what ProjectTrainer and RecBole's Trainer read from a train loader: iteration,
    len, `dataset`, `generator` (its state is saved in checkpoints, so resuming repeats
    the same order), `shuffle`; and `shards_steps` for the data-parallel loop.
    """

    shards_steps = True

    def __init__(
        self,
        config,
        recbole_loader,
        positions: str,
        device: torch.device,
        pad_batches: bool = False,
    ) -> None:
        if positions not in TRAIN_POSITIONS:
            raise ValueError(f"train_positions must be one of {TRAIN_POSITIONS}, got {positions!r}")
        self.dataset = recbole_loader.dataset
        self.positions = positions
        self.batch_size = int(config["train_batch_size"])
        self.device = torch.device(device)
        self.shuffle = True
        # Fixed shapes for CUDA graphs (pipeline/cuda_graphs.py): every `last` batch holds
        # batch_size rows; an `all` step WINDOW_MULTIPLE-rounded windows and batch_size + L - 1
        # targets (its most). Padding rows have label IGNORED_LABEL: the loss skips them.
        self.pad_batches = pad_batches
        distributed_run = distributed.is_distributed()
        self.rank = torch.distributed.get_rank() if distributed_run else 0
        self.world_size = torch.distributed.get_world_size() if distributed_run else 1
        self.generator = torch.Generator()  # the config's seed: the same order on every rank
        self.generator.manual_seed(int(config["seed"]))
        self.store = SequenceStore(self.dataset, int(config["MAX_ITEM_LIST_LENGTH"]))
        self.store.to(self.device)
        self._ends = torch.from_numpy(self.store.ends).to(self.device)
        self._lengths = torch.from_numpy(self.store.lengths).to(self.device)
        if positions == "all":
            start, length, first, rows = self.store.windows()
            self.window_targets = length - first  # (W,) on the CPU: cuts steps by targets
            self.window = {
                "start": torch.from_numpy(start).to(self.device),
                "length": torch.from_numpy(length).to(self.device),
                "first": torch.from_numpy(first).to(self.device),
                "row": torch.from_numpy(rows).to(self.device),
            }
        getLogger().info(
            f"training batches built on {self.device} ({positions} positions): "
            f"{len(self.store)} samples"
            + (f" in {len(self.window_targets)} windows" if positions == "all" else "")
        )

    def __len__(self) -> int:
        return math.ceil(len(self.store) / self.batch_size)

    def __iter__(self) -> Iterator[Interaction]:
        order = torch.randperm(self._count(), generator=self.generator)
        # One copy per epoch: a copy from pageable memory waits for the GPU's queue, so one
        # per step would stall every step.
        order_on_device = order.to(self.device)
        if self.positions == "last":
            for batch in order_on_device.split(self.batch_size):
                start, stop = share(len(batch), self.rank, self.world_size)
                weight = (stop - start) * self.world_size / len(batch)
                mine = batch[start:stop] if stop > start else batch[:1]  # weight 0: joins
                yield self._samples(mine, weight)
            return
        # Cut the shuffled windows where the running target count passes each multiple of
        # the batch size: every step holds about batch_size targets.
        targets = self.window_targets[order.numpy()]
        running = np.cumsum(targets)
        cuts = np.searchsorted(running, np.arange(self.batch_size, running[-1], self.batch_size))
        bounds = np.unique(np.r_[0, cuts + 1, len(order)].clip(max=len(order)))
        for a, b in zip(bounds[:-1], bounds[1:]):
            step = np.cumsum(targets[a:b])
            n_step = int(step[-1])
            # This rank's windows: those whose running count ends in its 1/N of the step.
            lo, hi = np.searchsorted(
                step, np.array([self.rank, self.rank + 1]) * n_step / self.world_size, side="right"
            )
            n_mine = int(step[hi - 1] - (step[lo - 1] if lo else 0)) if hi > lo else 0
            weight = n_mine * self.world_size / n_step
            if hi == lo:  # nothing left for this rank: one window at weight 0, to join
                lo, hi, n_mine = 0, 1, int(step[0])
            yield self._windows(order_on_device[a + lo : a + hi], n_mine, weight)

    def _count(self) -> int:
        return len(self.store) if self.positions == "last" else len(self.window_targets)

    def _with_weight(self, data: dict, weight: float) -> Interaction:
        if self.world_size > 1:
            data[STEP_WEIGHT] = torch.full((), weight, device=self.device)  # no host copy
        return Interaction(data)

    def _samples(self, index: torch.Tensor, weight: float) -> Interaction:
        store = self.store
        ends, lengths = self._ends[index], self._lengths[index]
        data = {store.uid_field: store.uids[index], store.length_field: lengths}
        for field in store.fields:
            data[field] = store.flat[field][ends]
            data[field + store.list_suffix] = store.histories(field, ends, lengths)
        if self.pad_batches:
            data = {k: _pad(v, self.batch_size, self._fill(k)) for k, v in data.items()}
        return self._with_weight(data, weight)

    def _windows(self, index: torch.Tensor, n_targets: int, weight: float) -> Interaction:
        store, window = self.store, self.window
        start, length = window["start"][index], window["length"][index]
        first = window["first"][index]
        counts = length - first  # (W,) targets per window
        row = torch.repeat_interleave(
            torch.arange(len(index), device=self.device), counts, output_size=n_targets
        )  # (n,) window of each target
        offset = torch.cumsum(counts, 0) - counts  # first target's slot per window
        position = first[row] + torch.arange(n_targets, device=self.device) - offset[row]
        ends = start + length  # a window is the history of the sample at its last position
        data = {
            store.uid_field: store.uids[window["row"][index]],
            store.length_field: length,
            POSITION_INDEX: row * store.max_length + position,  # into the flat (W * L)
        }
        for field in store.fields:
            data[field] = store.flat[field][start[row] + position + 1]
            data[field + store.list_suffix] = store.histories(field, ends, length)
        if self.pad_batches:
            windows = -(-len(index) // WINDOW_MULTIPLE) * WINDOW_MULTIPLE
            targets = max(n_targets, self.batch_size + store.max_length - 1)
            per_target = {POSITION_INDEX, *store.fields}
            data = {
                k: _pad(v, targets if k in per_target else windows, self._fill(k))
                for k, v in data.items()
            }
        return self._with_weight(data, weight)

    def _fill(self, field: str) -> int:
        """Value of `field` in padding rows: no label, a history of one (padding) item."""
        if field == self.dataset.iid_field:
            return IGNORED_LABEL
        return 1 if field == self.store.length_field else 0


def _pad(values: torch.Tensor, rows: int, fill: int) -> torch.Tensor:
    """`values` with rows appended up to `rows`, filled with `fill`."""
    if len(values) >= rows:
        return values
    padding = values.new_full((rows - len(values),) + tuple(values.shape[1:]), fill)
    return torch.cat([values, padding])


def make_train_loader(config, recbole_loader, device: torch.device | None = None):
    """The training loader the config asks for: RecBole's own, or DeviceTrainLoader (on
    `device`, default the config's)."""
    positions = config["train_positions"] or "last"
    if config["train_loader"] != "device" and positions == "last":
        return recbole_loader
    try:
        return DeviceTrainLoader(
            config,
            recbole_loader,
            positions,
            device or config["device"],
            pad_batches=bool(config["train_cuda_graph"]),
        )
    except SequenceStoreError as err:
        raise ConfigError(
            f"train_loader: device / train_positions: all cannot rebuild this dataset's "
            f"training samples: {err}. Use train_loader: recbole and train_positions: last"
        ) from None
