"""Top-k recommendations from a trained checkpoint: the Python API and the export behind recommend.py.

Two ways in, one scoring path (the model's own `full_sort_predict`):

- `Recommender.from_checkpoint(path, device=...)` rebuilds the model from the checkpoint
  alone (no dataset files) and scores new histories given as raw item ids and timestamps,
  one at a time (`recommend`, the low-latency path) or many (`recommend_batch`).
- `export_recommendations(...)` rebuilds the training run's dataset and streams the top-k
  items of every (or every listed) user to CSV or Parquet. A user's history is the whole
  known sequence, including the interactions held out for validation and test: the
  question answered is "what comes after everything we know".

Histories are laid out as RecBole lays them out in training: left-aligned, zero-padded to
MAX_ITEM_LIST_LENGTH, the most recent items kept. Item ids are the raw tokens of the data
files (compared as strings); index 0 ("[PAD]") is never recommended.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from recbole.config import Config
from recbole.data.interaction import Interaction
from scipy.sparse import csr_matrix
from tqdm import tqdm

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.config import build_config
from pipeline.registry import get_model_class
from pipeline.runner import prepare_run
from pipeline.validate import validate_config

PAD_TOKEN = "[PAD]"  # RecBole's token for internal index 0
FORMATS = ("csv", "parquet")
UNKNOWN_POLICIES = ("raise", "drop")
# RecBole stores float fields (timestamps included) as float32; scoring must see the same values.
TIME_DTYPE = torch.float32


class InferenceError(ValueError):
    """Input that cannot be scored (unknown ids, bad timestamps, bad k); the message says why."""


# --- the checkpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRun:
    """The checkpoint fields inference reads, and only those (other fields may come and go)."""

    path: Path
    model: str
    dataset: str
    n_users: int
    n_items: int
    config: dict
    item_tokens: list[str]
    state_dict: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> StoredRun:
        payload = load_checkpoint(path)
        try:
            identity = payload["identity"]
            run = cls(
                path=Path(path),
                model=str(identity["model"]),
                dataset=str(identity["dataset"]),
                n_users=int(identity["n_users"]),
                n_items=int(identity["n_items"]),
                config=dict(payload["config"]),
                item_tokens=[str(token) for token in payload["item_tokens"]],
                state_dict=payload["state_dict"],
            )
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{path} lacks {err}, which recommendations need (identity, config, "
                "item_tokens, state_dict); re-save it with this version of run.py"
            ) from None
        if len(run.item_tokens) != run.n_items or run.item_tokens[:1] != [PAD_TOKEN]:
            raise CheckpointError(
                f"{path}: item_tokens ({len(run.item_tokens)} ids) do not describe its "
                f"{run.n_items} items with {PAD_TOKEN} first; the file is damaged"
            )
        return run


class CheckpointDataset:
    """The little a RecBole model's constructor reads from its dataset, from a checkpoint.

    SequentialRecommender reads `dataset.num(ITEM_ID_FIELD)`; Caser also reads `user_num`.
    A model that reads anything else fails here, naming the attribute.
    """

    def __init__(self, config, n_users: int, n_items: int) -> None:
        self.uid_field = config["USER_ID_FIELD"]
        self.iid_field = config["ITEM_ID_FIELD"]
        self.user_num = n_users
        self.item_num = n_items

    def num(self, field: str) -> int:
        if field == self.iid_field:
            return self.item_num
        if field == self.uid_field:
            return self.user_num
        raise AttributeError(self._missing(f"num({field!r})"))

    def __getattr__(self, name: str):  # only reached for attributes not set in __init__
        raise AttributeError(self._missing(name))

    @staticmethod
    def _missing(what: str) -> str:
        return (
            f"this model reads dataset.{what}, which a checkpoint does not store, so it cannot "
            "be rebuilt without its dataset; use recommend.py (it loads the data)"
        )


def build_model(
    run: StoredRun, device: str | torch.device = "cpu", overrides: dict | None = None
) -> tuple[torch.nn.Module, Config]:
    """(model in eval mode on `device`, RecBole Config), from the checkpoint alone."""
    device = _device(device)
    model_class = get_model_class(run.model)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        config = build_config(model_class, [], {**run.config, **(overrides or {})})
    finally:
        # RecBole's Config sets CUDA_VISIBLE_DEVICES from gpu_id: a library call must not
        # hide the caller's GPUs.
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    validate_config(config)
    config["device"] = device
    # The constructor draws initial weights; keep the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        model = model_class(config, CheckpointDataset(config, run.n_users, run.n_items))
    load_weights(model, run)
    return model.to(device).eval(), config


def load_weights(model: torch.nn.Module, run: StoredRun) -> None:
    try:
        model.load_state_dict(run.state_dict)
    except RuntimeError as err:
        raise CheckpointError(
            f"{run.path} does not fit the model built from its own config (were architecture "
            f"keys overridden?): {str(err).splitlines()[0]} ..."
        ) from None


def model_uses_time(model: torch.nn.Module) -> bool:
    """TiM4Rec-style models say so with `is_time`; others that read a time list have `time_field`."""
    is_time = getattr(model, "is_time", None)
    return bool(is_time) if is_time is not None else hasattr(model, "time_field")


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {device} asked for, but CUDA is not available; use 'cpu'")
    return device


# --- scoring ----------------------------------------------------------------------------


def check_k(k: int, n_items: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n_items:
        raise InferenceError(f"k must be an integer from 1 to {n_items - 1} (the items), got {k!r}")


def masked_top_k(
    scores: torch.Tensor, k: int, seen: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, item indices) per row of `scores` (B, V), on the host.

    Padding (index 0) and the (row, item) pairs in `seen` are never returned; rows left with
    fewer than k candidates get -inf scores in their last places (callers drop those).
    Scores come back as float32 whatever the model's output dtype (bf16 under autocast).
    """
    scores[:, 0] = -torch.inf
    if seen is not None and len(seen[0]):
        rows, cols = (torch.from_numpy(a).to(scores.device) for a in seen)
        scores[rows, cols] = -torch.inf
    values, index = torch.topk(scores, k, dim=1)  # (B, k)
    return values.float().cpu().numpy(), index.cpu().numpy()


class Recommender:
    """A checkpoint loaded once, scoring histories of raw item ids.

    Example::

        rec = Recommender.from_checkpoint("saved/TiM4Rec-ml-100k-<time>.pth", device="cuda")
        rec.recommend(["242", "302", "377"], timestamps=[881250949, 881251000, 881252000], k=5)
        # -> [(raw item id, score), ...], best first

    Histories are oldest first. `timestamps` (unix seconds, one per item, non-decreasing)
    are required by models that use time (TiM4Rec) and checked but ignored by the others
    (SSD4Rec, SASRec, ...). Only the last MAX_ITEM_LIST_LENGTH items are scored; all are
    excluded with `exclude_seen=True`. Unknown item ids raise InferenceError listing them;
    `unknown="drop"` drops them (with their timestamps) and warns instead.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config,
        item_tokens: list[str],
        cuda_graph: bool | None = None,
    ) -> None:
        if hasattr(model, "user_embedding"):
            raise InferenceError(
                f"{type(model).__name__} scores with a per-user embedding, so it cannot score a "
                "new history without a known user; use recommend.py for the dataset's users"
            )
        self.model = model
        self.device = torch.device(config["device"])
        self.item_tokens = list(item_tokens)  # internal index -> raw id; 0 is padding
        self.n_items = len(self.item_tokens)
        self.max_length = int(config["MAX_ITEM_LIST_LENGTH"])
        self.uses_time = model_uses_time(model)
        self._tokens = np.asarray(self.item_tokens, dtype=object)
        self._index = {token: i for i, token in enumerate(self.item_tokens) if i}
        self._seq_field = model.ITEM_SEQ
        self._len_field = model.ITEM_SEQ_LEN
        self._time_field = config["TIME_FIELD"] + config["LIST_SUFFIX"]
        self._one = self._buffers()  # the single-history path reuses these every call
        self._graph = None  # (graph, its output scores) once captured
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise InferenceError("cuda_graph=True needs a CUDA device")
        if cuda_graph:
            self._graph = self._capture_graph()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        overrides: dict | None = None,
        cuda_graph: bool | None = None,
    ) -> Recommender:
        """Load `path` (a run.py checkpoint) onto `device`; no dataset files are read.

        `overrides` are config keys applied over the stored config, e.g. {"ssd_backend": "torch"}.
        `cuda_graph` (default: on for CUDA) replays the single-history forward as one CUDA
        graph; if the model cannot be captured it warns and runs eagerly.
        """
        run = StoredRun.load(path)
        model, config = build_model(run, device, overrides)
        return cls(model, config, run.item_tokens, cuda_graph=cuda_graph)

    @property
    def item_ids(self) -> list[str]:
        """Every recommendable raw item id (padding excluded)."""
        return self.item_tokens[1:]

    def recommend(
        self,
        item_ids: Sequence,
        timestamps: Sequence[float] | None = None,
        k: int = 10,
        exclude_seen: bool = False,
        unknown: str = "raise",
    ) -> list[tuple[str, float]]:
        """Top-k (raw item id, score) after one history, best first."""
        check_k(k, self.n_items)
        index, times = self._encode(item_ids, timestamps, unknown)
        with torch.inference_mode():
            scores = self._score_one(index, times)  # (1, V)
            seen = (np.zeros(len(index), dtype=np.int64), index) if exclude_seen else None
            values, top = masked_top_k(scores, k, seen)
        return self._rows(values, top)[0]

    def recommend_batch(
        self,
        histories: Sequence[Sequence],
        timestamps: Sequence[Sequence[float] | None] | None = None,
        k: int = 10,
        exclude_seen: bool = False,
        unknown: str = "raise",
        batch_size: int = 1024,
    ) -> list[list[tuple[str, float]]]:
        """`recommend` for many histories, scored `batch_size` at a time."""
        check_k(k, self.n_items)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InferenceError(f"batch_size must be a positive integer, got {batch_size!r}")
        if timestamps is not None and len(timestamps) != len(histories):
            raise InferenceError(
                f"{len(histories)} histories but {len(timestamps)} timestamp lists; give one per history"
            )
        encoded = []
        for n, items in enumerate(histories):
            times = None if timestamps is None else timestamps[n]
            try:
                encoded.append(self._encode(items, times, unknown))
            except InferenceError as err:
                raise InferenceError(f"history {n}: {err}") from None
        results = []
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                scores = self.model.full_sort_predict(self._interaction(chunk))
                scores = scores.view(len(chunk), -1)  # (B, V)
                seen = None
                if exclude_seen:
                    rows = np.repeat(np.arange(len(chunk)), [len(index) for index, _ in chunk])
                    seen = (rows, np.concatenate([index for index, _ in chunk]))
                results.extend(self._rows(*masked_top_k(scores, k, seen)))
        return results

    def score(
        self, item_ids: Sequence, timestamps: Sequence[float] | None = None, unknown: str = "raise"
    ) -> torch.Tensor:
        """The model's score of every item after one history: (n_items,) on the CPU, aligned
        with `item_tokens` (index 0 is padding and scores -inf)."""
        index, times = self._encode(item_ids, timestamps, unknown)
        with torch.inference_mode():
            scores = self._score_one(index, times)[0]  # (V,)
            scores[0] = -torch.inf
        return scores.cpu().clone()  # a clone outside inference mode is an ordinary tensor

    # -- internals --

    def _encode(self, item_ids, timestamps, unknown: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw ids (and timestamps) -> (internal indices, float32 times or None), all items kept."""
        if unknown not in UNKNOWN_POLICIES:
            raise InferenceError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
        if isinstance(item_ids, (str, bytes)):
            raise InferenceError("item_ids must be a list of item ids, not one string")
        tokens = [str(item) for item in item_ids]
        if not tokens:
            raise InferenceError("the history is empty: give at least one item id")
        times = None
        if timestamps is not None:
            times = check_timestamps(timestamps, len(tokens))
        elif self.uses_time:
            raise InferenceError(
                f"{type(self.model).__name__} uses the time between interactions: pass "
                "timestamps=[...] (unix seconds, one per item, oldest first)"
            )
        index = [self._index.get(token, 0) for token in tokens]
        if 0 in index:
            missing = list(dict.fromkeys(t for t, i in zip(tokens, index) if i == 0))
            shown = ", ".join(repr(t) for t in missing[:10]) + (" ..." if len(missing) > 10 else "")
            message = (
                f"{len(missing)} item id(s) not in the model's catalogue of "
                f"{self.n_items - 1} items: {shown}"
            )
            if unknown == "raise":
                raise InferenceError(message + "; pass unknown='drop' to score the others")
            keep = [n for n, i in enumerate(index) if i]
            if not keep:
                raise InferenceError(message + "; no known item is left to score")
            warnings.warn(message + "; dropped", stacklevel=3)
            index = [index[n] for n in keep]
            times = None if times is None else times[keep]
        return np.asarray(index, dtype=np.int64), times

    def _host_tensors(self, batch: int) -> dict[str, torch.Tensor]:
        """Zeroed model inputs for `batch` histories, as RecBole pads them."""
        fields = {
            self._seq_field: torch.zeros(batch, self.max_length, dtype=torch.long),  # (B, L)
            self._len_field: torch.zeros(batch, dtype=torch.long),  # (B,)
        }
        if self.uses_time:
            fields[self._time_field] = torch.zeros(batch, self.max_length, dtype=TIME_DTYPE)
        return fields

    def _buffers(self) -> dict:
        """Preallocated inputs of the single-history path (pinned staging on CUDA)."""
        with torch.inference_mode():
            host = self._host_tensors(1)
            if self.device.type == "cuda":
                host = {name: tensor.pin_memory() for name, tensor in host.items()}
                device = {name: tensor.to(self.device) for name, tensor in host.items()}
            else:
                device = host
        return {"host": host, "device": device, "interaction": Interaction(device)}

    def _fill(self, host: dict, row: int, index: np.ndarray, times: np.ndarray | None) -> None:
        n = min(len(index), self.max_length)  # the most recent items
        host[self._seq_field][row, :n] = torch.from_numpy(index[-n:])
        host[self._len_field][row] = n
        if self.uses_time:
            host[self._time_field][row, :n] = torch.from_numpy(times[-n:])

    def _score_one(self, index: np.ndarray, times: np.ndarray | None) -> torch.Tensor:
        buffers = self._one
        host = buffers["host"]
        for tensor in host.values():
            tensor.zero_()
        self._fill(host, 0, index, times)
        if host is not buffers["device"]:
            for name, tensor in buffers["device"].items():
                tensor.copy_(host[name], non_blocking=True)
        if self._graph is not None:
            graph, scores = self._graph
            graph.replay()  # rewrites `scores` from the buffers just filled
            return scores
        return self.model.full_sort_predict(buffers["interaction"]).view(1, -1)  # (1, V)

    def _capture_graph(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Record the single-history forward on its fixed buffers as a CUDA graph.

        Eager PyTorch launches a few hundred small kernels per history, so launch overhead,
        not arithmetic, sets the latency; a graph replays them with one launch. The replay
        is checked against eager scores once; any failure falls back to eager scoring.
        """
        length = self.max_length
        example = np.arange(length, dtype=np.int64) % (self.n_items - 1) + 1
        times = (1.6e9 + 3600.0 * np.arange(length)).astype(np.float32)
        interaction = self._one["interaction"]
        try:
            with torch.inference_mode():
                eager = self._score_one(example, times).clone()
                current = torch.cuda.current_stream(self.device)
                # Warm-up and capture on one stream of this Recommender's: cuBLAS keeps a
                # workspace per stream for the life of the process (pipeline/cuda_graphs.py).
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        self.model.full_sort_predict(interaction)
                current.wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    scores = self.model.full_sort_predict(interaction).view(1, -1)  # (1, V)
                graph.replay()
                if not torch.allclose(scores, eager, rtol=1e-4, atol=1e-4):
                    raise RuntimeError("graph replay differs from eager scores")
        except Exception as err:  # whatever failed in capture, eager scoring still works
            warnings.warn(f"CUDA graph capture failed, scoring eagerly: {err}", stacklevel=3)
            return None
        return graph, scores

    @property
    def cuda_graph(self) -> bool:
        """Whether single histories are scored by replaying a captured CUDA graph."""
        return self._graph is not None

    def _interaction(self, chunk: list) -> Interaction:
        host = self._host_tensors(len(chunk))
        for row, (index, times) in enumerate(chunk):
            self._fill(host, row, index, times)
        return Interaction({name: tensor.to(self.device) for name, tensor in host.items()})

    def _rows(self, values: np.ndarray, index: np.ndarray) -> list[list[tuple[str, float]]]:
        return [
            [(self._tokens[i], float(v)) for v, i in zip(vs, ix) if v > -np.inf]
            for vs, ix in zip(values, index)
        ]


def check_timestamps(timestamps: Sequence[float], n_items: int) -> np.ndarray:
    """One finite, non-decreasing (oldest first) timestamp per item -> float32 array."""
    if isinstance(timestamps, (str, bytes)):
        raise InferenceError("timestamps must be a list of numbers (unix seconds)")
    try:
        times = np.asarray(timestamps, dtype=np.float64)
    except (TypeError, ValueError):
        raise InferenceError("timestamps must be numbers (unix seconds)") from None
    if times.shape != (n_items,):
        raise InferenceError(
            f"{n_items} item ids but {times.size} timestamps; give one timestamp per item"
        )
    if not np.isfinite(times).all():
        raise InferenceError("timestamps must be finite numbers (unix seconds)")
    back = np.flatnonzero(np.diff(times) < 0)
    if back.size:
        n = int(back[0]) + 1
        raise InferenceError(
            f"timestamps go back in time at position {n} ({times[n]:.0f} after "
            f"{times[n - 1]:.0f}); histories are oldest first: sort the items by time"
        )
    return times.astype(np.float32)


# --- export for the dataset's users -----------------------------------------------------


class UserSequences:
    """Each user's whole known sequence (last MAX_ITEM_LIST_LENGTH items), from a built dataset.

    RecBole's sequential dataset keeps one row per interaction after the first: the
    interaction as target and up to MAX_ITEM_LIST_LENGTH earlier ones as history. A user's
    last row (rows stay in time order within a user: RecBole's sorts are stable) holds the
    longest history; appending its target gives the full sequence.
    """

    def __init__(self, dataset, config) -> None:
        if config["eval_args"]["order"] != "TO":
            raise InferenceError(
                "recommendations need time-ordered sequences: eval_args.order must be TO"
            )
        self.feat = dataset.inter_feat
        self.uid_field = dataset.uid_field
        self.iid_field = dataset.iid_field
        self.length_field = config["ITEM_LIST_LENGTH_FIELD"]
        self.max_length = int(config["MAX_ITEM_LIST_LENGTH"])
        self.suffix = config["LIST_SUFFIX"]
        self.n_items = int(dataset.item_num)
        uid = self.feat[self.uid_field].numpy()
        users, first_from_end = np.unique(uid[::-1], return_index=True)
        self.last_row = np.full(int(dataset.user_num), -1, dtype=np.int64)
        self.last_row[users] = len(uid) - 1 - first_from_end
        self.fields = [
            field
            for field in self.feat.interaction
            if field + self.suffix in self.feat.interaction and self.feat[field].dim() == 1
        ]

    def users(self) -> np.ndarray:
        """Internal ids of the users that have a sequence."""
        return np.flatnonzero(self.last_row >= 0)

    def batch(self, users: np.ndarray) -> Interaction:
        """The sequences of `users` (internal ids) as a model input batch."""
        rows = torch.from_numpy(self.last_row[users])
        length = self.feat[self.length_field][rows]  # (B,)
        full = length >= self.max_length  # appending the target pushes the oldest item out
        batch = {
            self.uid_field: torch.from_numpy(np.asarray(users, dtype=np.int64)),
            self.length_field: torch.clamp(length + 1, max=self.max_length),
        }
        arange = torch.arange(len(rows))
        for field in self.fields:
            history = self.feat[field + self.suffix][rows]  # (B, L)
            seq = torch.cat([history, torch.zeros_like(history[:, :1])], dim=1)  # (B, L + 1)
            seq[arange, length] = self.feat[field][rows]
            batch[field + self.suffix] = torch.where(full[:, None], seq[:, 1:], seq[:, :-1])
        return Interaction(batch)

    def interacted(self):
        """(n_users, n_items) CSR matrix of every item each user interacted with (all time)."""
        uid = self.feat[self.uid_field].numpy()
        # Every interaction but a user's first is some row's target; the first is the
        # one-item history of the row with history length 1.
        first = (self.feat[self.length_field] == 1).numpy()
        users = np.concatenate([uid, uid[first]])
        items = np.concatenate(
            [self.feat[self.iid_field].numpy(), self.feat[self.iid_field + self.suffix][first, 0]]
        )
        ones = np.ones(len(users), dtype=np.bool_)
        return csr_matrix((ones, (users, items)), shape=(len(self.last_row), self.n_items))


def output_format(path: Path, file_format: str | None) -> str:
    """`file_format` or, when None, the one the file name says (.parquet/.pq, else csv)."""
    if file_format is None:
        file_format = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
    if file_format not in FORMATS:
        raise InferenceError(f"format must be one of {FORMATS}, got {file_format!r}")
    if file_format == "parquet":
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise InferenceError(
                "Parquet output needs pyarrow: pip install pyarrow (or write CSV: --format csv)"
            ) from None
    return file_format


class AtomicTableWriter:
    """Streams (user_id, rank, item_id, score) batches to a temporary file beside `path` and
    renames it onto `path` only when every batch was written: an error leaves no file."""

    def __init__(self, path: Path, file_format: str) -> None:
        self.path = Path(path)
        self.file_format = file_format
        self.rows = 0
        # Not mkstemp: its 0600 mode would stick to the output; "x" mode keeps the umask's.
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")

    def __enter__(self) -> AtomicTableWriter:
        if self.file_format == "csv":
            self.file = open(self.tmp, "x", newline="", encoding="utf-8")
            self.file.write("user_id,rank,item_id,score\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema(
                [
                    ("user_id", pa.string()),
                    ("rank", pa.int32()),
                    ("item_id", pa.string()),
                    ("score", pa.float32()),
                ]
            )
            self.file = pq.ParquetWriter(self.tmp, self.schema)
        return self

    def write(self, users, ranks, items, scores) -> None:
        """One batch of rows; the four columns have equal lengths."""
        if self.file_format == "csv":
            frame = pd.DataFrame(
                {"user_id": users, "rank": ranks, "item_id": items, "score": scores}
            )
            frame.to_csv(self.file, header=False, index=False)
        else:
            import pyarrow as pa

            types = [field.type for field in self.schema]
            columns = [pa.array(c, t) for c, t in zip((users, ranks, items, scores), types)]
            self.file.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows += len(users)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)  # gone after a successful rename


def export_recommendations(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    k: int = 10,
    users: Sequence[str] | None = None,
    exclude_history: bool = False,
    batch_size: int = 1024,
    file_format: str | None = None,
    device: str | torch.device | None = None,
    overrides: dict | None = None,
) -> dict:
    """Write the top-k items of `users` (raw ids; None: every user with a sequence) to `output`.

    Long format, one row per (user, rank): user_id, rank (1 = best), item_id, score. Rows
    follow `users`' order (duplicates once), else internal user order. A user whose candidates
    run out under `exclude_history` gets fewer than k rows. Returns a summary dict.
    """
    output = Path(output).resolve()
    file_format = output_format(output, file_format)
    if not output.parent.is_dir():
        raise InferenceError(f"output folder {output.parent} does not exist; create it first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InferenceError(f"batch size must be a positive integer, got {batch_size!r}")
    run = StoredRun.load(checkpoint)
    check_k(k, run.n_items)

    config, dataset, _, model = prepare_run(
        run.model, [], {**run.config, **(overrides or {})}, training=False
    )
    _check_same_data(run, dataset, config)
    load_weights(model, run)
    device = _device(device) if device is not None else torch.device(config["device"])
    model = model.to(device).eval()

    sequences = UserSequences(dataset, config)
    selected = _select_users(dataset, sequences, users)
    seen_matrix = sequences.interacted() if exclude_history else None
    user_tokens = np.asarray(dataset.field2id_token[dataset.uid_field], dtype=object)
    item_tokens = np.asarray(run.item_tokens, dtype=object)
    ranks = np.arange(1, k + 1, dtype=np.int32)

    bar = tqdm(
        total=len(selected), unit="user", desc="recommend", disable=not config["show_progress"]
    )
    with AtomicTableWriter(output, file_format) as writer, torch.inference_mode(), bar:
        for start in range(0, len(selected), batch_size):
            batch_users = selected[start : start + batch_size]
            scores = model.full_sort_predict(sequences.batch(batch_users).to(device))
            scores = scores.view(len(batch_users), -1)  # (B, V)
            seen = None
            if seen_matrix is not None:
                rows = seen_matrix[batch_users].tocoo()
                seen = (rows.row.astype(np.int64), rows.col.astype(np.int64))
            values, index = masked_top_k(scores, k, seen)  # (B, k)
            keep = np.isfinite(values).ravel()
            writer.write(
                np.repeat(user_tokens[batch_users], k)[keep],
                np.tile(ranks, len(batch_users))[keep],
                item_tokens[index.ravel()][keep],
                values.ravel()[keep],
            )
            bar.update(len(batch_users))
    getLogger().info(f"wrote {writer.rows} recommendations for {len(selected)} users to {output}")
    return {"path": str(output), "users": len(selected), "rows": writer.rows, "format": file_format}


def _check_same_data(run: StoredRun, dataset, config) -> None:
    """The checkpoint's item indices mean the same items in the rebuilt dataset."""
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    if int(dataset.user_num) != run.n_users or tokens != run.item_tokens:
        raise CheckpointError(
            f"the dataset '{config['dataset']}' read from {config['data_path']} is not the one "
            f"{run.path.name} was trained on ({dataset.user_num} users and {len(tokens)} items "
            f"here, {run.n_users} and {run.n_items} there, or other item ids); point "
            "--data_path at the training data and keep its filtering keys"
        )


def _select_users(dataset, sequences: UserSequences, users: Sequence[str] | None) -> np.ndarray:
    """Internal ids of the users to export, in the asked order."""
    if users is None:
        selected = sequences.users()
        skipped = int(dataset.user_num) - 1 - len(selected)  # - 1: the padding user
        if skipped:
            getLogger().warning(f"{skipped} users have a single interaction: no history, skipped")
        return selected
    users = list(dict.fromkeys(str(user) for user in users))
    if not users:
        raise InferenceError("no user ids given")
    token_id = dataset.field2token_id[dataset.uid_field]
    unknown = [user for user in users if user not in token_id or token_id[user] == 0]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise InferenceError(
            f"{len(unknown)} of {len(users)} user ids are not in dataset "
            f"'{dataset.dataset_name}' (after its filtering): {shown}"
        )
    selected = np.asarray([token_id[user] for user in users], dtype=np.int64)
    lonely = [u for u, i in zip(users, selected) if sequences.last_row[i] < 0]
    if lonely:
        raise InferenceError(
            f"{len(lonely)} user(s) have a single interaction, no history to recommend from: "
            + ", ".join(repr(u) for u in lonely[:10])
        )
    return selected
