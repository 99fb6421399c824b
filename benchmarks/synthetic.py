"""A synthetic interaction log with the shape of MovieLens-1M, in RecBole's atomic format.

ML-1M is the paper's efficiency workload but cannot be downloaded on the benchmark
machines. Speed depends on the shape of the data, not on its values, so we generate a
log with ML-1M's shape after the 5-core filter: 6,040 users, 3,416 items, about
1,000,000 interactions, user lengths from 20 to 2,314 with a long tail (median about
100), a skewed (Zipf-like) item popularity, no repeated item within a user, and strictly
increasing timestamps per user with irregular gaps (bursts of seconds to minutes, now
and then days). Everything is vectorised numpy and deterministic from the seed.

    python -m benchmarks.synthetic            # writes dataset/ml-1m-synthetic/ (cached)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GENERATOR_VERSION = 1  # bump when the generated data changes for the same spec
FIRST_TIMESTAMP = 956_703_932  # ML-1M's first rating (2000-04-25), unix seconds


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the generated log; `ML1M` matches MovieLens-1M after the 5-core filter."""

    name: str
    n_users: int
    n_items: int
    n_interactions: int
    min_length: int = 20  # ML-1M keeps users with at least 20 ratings
    max_length: int = 2314  # ML-1M's longest user
    length_sigma: float = 1.0  # log-normal spread of the lengths above min_length
    popularity_exponent: float = 1.6  # item weights (rank + offset) ** -exponent
    popularity_offset: float = 100.0  # flattens the head, as ML-1M's is
    min_item_count: int = 5  # every item survives the 5-core filter
    seed: int = 2020

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(f"{self.name}: need at least one user and one item")
        if not 1 <= self.min_length <= self.max_length <= self.n_items:
            raise ValueError(
                f"{self.name}: need 1 <= min_length ({self.min_length}) <= max_length "
                f"({self.max_length}) <= n_items ({self.n_items}): a user rates an item once"
            )
        # One user has max_length, the others min_length .. max_length.
        lo = self.max_length + (self.n_users - 1) * self.min_length
        hi = self.n_users * self.max_length
        if not lo <= self.n_interactions <= hi:
            raise ValueError(
                f"{self.name}: n_interactions must lie in [{lo}, {hi}] for {self.n_users} "
                f"users of {self.min_length}..{self.max_length} items, got {self.n_interactions}"
            )
        if self.n_items * self.min_item_count > self.n_interactions:
            raise ValueError(
                f"{self.name}: {self.n_items} items x {self.min_item_count} need more than "
                f"{self.n_interactions} interactions"
            )


ML1M = SyntheticSpec("ml-1m-synthetic", n_users=6040, n_items=3416, n_interactions=1_000_209)
# A tenth of ML-1M's users with shorter histories: a CPU epoch of a few seconds per model.
ML1M_SMALL = SyntheticSpec(
    "ml-1m-synthetic-small", n_users=600, n_items=1200, n_interactions=40_000, max_length=400
)


def _apportion(weights: np.ndarray, total: int, lo: int, hi: int) -> np.ndarray:
    """Integers in [lo, hi] summing to `total`, lo + (about) proportional to `weights`."""
    extra, cap = total - lo * len(weights), hi - lo
    if not (weights > 0).any():
        weights = np.ones_like(weights)  # e.g. a single other user: no spread to follow

    def filled(scale: float) -> np.ndarray:
        return np.minimum(weights * scale, cap)

    low, high = 0.0, float(cap) / weights[weights > 0].min()
    for _ in range(100):  # bisection on the scale: sum(floor) <= extra <= sum(ceil)
        mid = 0.5 * (low + high)
        if filled(mid).sum() > extra:
            high = mid
        else:
            low = mid
    share = filled(low)
    counts = np.floor(share).astype(np.int64)
    remainder = extra - int(counts.sum())
    order = np.argsort(-(share - counts) - (counts < cap), kind="stable")  # not-full first
    if remainder > int((counts < cap).sum()):
        raise AssertionError("apportioning failed")  # cannot happen: sum(share) <= extra
    counts[order[:remainder]] += 1
    return lo + counts


def generate(spec: SyntheticSpec) -> pd.DataFrame:
    """The log as a DataFrame (user_id, item_id, timestamp), sorted by user then time."""
    rng = np.random.default_rng(spec.seed)
    n_users, n_items = spec.n_users, spec.n_items

    # User lengths: one user at max_length (as in ML-1M), the others min_length + a
    # log-normal long tail, apportioned to the exact total.
    tail = rng.lognormal(mean=0.0, sigma=spec.length_sigma, size=n_users)
    tail -= tail.min()  # the shortest user has exactly min_length
    longest = int(np.argmax(tail))
    lengths = np.full(n_users, spec.max_length, dtype=np.int64)
    others = np.arange(n_users) != longest
    if n_users > 1:
        lengths[others] = _apportion(
            tail[others], spec.n_interactions - spec.max_length, spec.min_length, spec.max_length
        )

    # Items: each user picks `length` distinct items, weighted by popularity (Gumbel top-k).
    log_weight = -spec.popularity_exponent * np.log(np.arange(n_items) + spec.popularity_offset)
    item_of_rank = rng.permutation(n_items)  # popularity rank -> item id, so ids are not sorted
    keys = log_weight[None, :].astype(np.float32) + rng.gumbel(size=(n_users, n_items)).astype(
        np.float32
    )  # (users, items)
    order = np.argsort(-keys, axis=1)  # (users, items), most wanted first
    chosen = np.zeros((n_users, n_items), dtype=bool)
    take = np.arange(n_items)[None, :] < lengths[:, None]
    rows = np.broadcast_to(np.arange(n_users)[:, None], order.shape)
    chosen[rows[take], order[take]] = True
    _ensure_min_count(chosen, spec.min_item_count, rng)

    users, ranks = np.nonzero(chosen)  # sorted by user
    # Order inside each user: random (popular items are not front-loaded).
    shuffle = np.lexsort((rng.random(len(users)), users))
    users, items = users[shuffle], item_of_rank[ranks[shuffle]]

    # Timestamps: a start per user, then gaps of log-normal seconds (median about a minute,
    # a heavy tail into days), at least 1 s so that the order is unambiguous.
    starts = FIRST_TIMESTAMP + rng.integers(0, 700 * 86_400, size=n_users)
    gaps = np.maximum(1, rng.lognormal(mean=np.log(60.0), sigma=2.5, size=len(users))).astype(
        np.int64
    )
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # index of each user's first row
    gaps[first] = 0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first], lengths)  # restart the clock at each user
    timestamps = np.repeat(starts, lengths) + elapsed
    return pd.DataFrame({"user_id": users + 1, "item_id": items + 1, "timestamp": timestamps})


def _ensure_min_count(chosen: np.ndarray, min_count: int, rng: np.random.Generator) -> None:
    """Give every item at least `min_count` users, swapping out each donor's most popular item."""
    counts = chosen.sum(axis=0)
    for item in np.flatnonzero(counts < min_count):
        need = min_count - int(counts[item])
        candidates = np.flatnonzero(~chosen[:, item])
        for user in rng.choice(candidates, size=need, replace=False):
            owned = np.flatnonzero(chosen[user])
            donor = owned[np.argmax(counts[owned])]  # the user's most popular item
            if counts[donor] <= min_count:
                continue  # nothing to spare (only for tiny specs)
            chosen[user, donor], chosen[user, item] = False, True
            counts[donor] -= 1
            counts[item] += 1


def write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write the log as `<name>.inter` (RecBole atomic format), via a temporary file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("user_id:token\titem_id:token\ttimestamp:float\n")
            frame.to_csv(f, sep="\t", header=False, index=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_dataset(spec: SyntheticSpec, data_path: str | os.PathLike) -> Path:
    """Write `data_path/<name>/<name>.inter` unless an identical one is cached there."""
    folder = Path(data_path) / spec.name
    inter = folder / f"{spec.name}.inter"
    meta_path = folder / f"{spec.name}.spec.json"
    meta = {"generator_version": GENERATOR_VERSION, **asdict(spec)}
    if inter.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return inter
        except json.JSONDecodeError:
            pass  # a damaged cache is regenerated
    write_atomic(generate(spec), inter)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return inter


def describe(frame: pd.DataFrame) -> dict:
    """The shape statistics that matter for speed (and that the tests check)."""
    lengths = frame.groupby("user_id").size()
    popularity = frame.groupby("item_id").size()
    return {
        "users": int(frame["user_id"].nunique()),
        "items": int(frame["item_id"].nunique()),
        "interactions": len(frame),
        "length_min": int(lengths.min()),
        "length_median": float(lengths.median()),
        "length_max": int(lengths.max()),
        "item_count_min": int(popularity.min()),
        "item_count_median": float(popularity.median()),
        "item_count_max": int(popularity.max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU-sized log instead")
    parser.add_argument("--data-path", default="dataset", help="folder to write <name>/ into")
    args = parser.parse_args(argv)
    spec = ML1M_SMALL if args.small else ML1M
    inter = ensure_dataset(spec, args.data_path)
    print(inter)
    print(
        json.dumps(
            describe(
                pd.read_csv(inter, sep="\t", names=["user_id", "item_id", "timestamp"], skiprows=1)
            )
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
