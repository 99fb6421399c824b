"""How much do leave-one-out metrics depend on the order of same-timestamp interactions?

    python -m benchmarks.tie_order --source dataset/amazon-beauty/amazon-beauty.inter \\
        --modes reverse,popular-last
    python -m benchmarks.reproduce --dataset amazon-beauty-reverse --models TiM4Rec,SASRec ...

Day-granular logs such as Amazon's tie often: in Amazon Beauty 5-core, 43% of users' last
interactions (their test targets) share the day of the interaction before. RecBole sorts
by time with a stable sort, so the file's row order decides which of the tied items is the
target and which are history. This writes copies of a dataset that differ only in that
order, as `dataset/<name>-<mode>/<name>-<mode>.inter`:

- reverse: each run of tied rows of a user in the opposite order;
- popular-last: tied rows ordered by item popularity, the most popular last (so it tends
  to become the target: a learnable, and easier, convention);
- popular-first: the least popular last (harder).

Training the same model on each copy shows how far the convention alone moves the numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from datatools.atomic import atomic_output, tied_target_share

MODES = ("reverse", "popular-last", "popular-first")


def reorder_ties(frame: pd.DataFrame, mode: str, user: str, item: str, time: str) -> pd.DataFrame:
    """`frame` (in file order) with each user's same-timestamp rows reordered by `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    users = pd.factorize(frame[user])[0]
    times = frame[time].to_numpy()
    position = np.arange(len(frame))
    if mode == "reverse":
        within = -position
    else:
        popularity = frame[item].map(frame[item].value_counts()).to_numpy()
        within = popularity if mode == "popular-last" else -popularity
        within = within * len(frame) + position  # equal popularity: keep the file's order
    order = np.lexsort((within, times, users))  # by user, then time, then the tie rule
    return frame.iloc[order]


def write_variant(source: Path, mode: str, out_root: Path) -> tuple[Path, float]:
    """Write the `mode` copy of `source`; return its path and its share of tied targets."""
    name = f"{source.name.split('.')[0]}-{mode}"
    target = out_root / name / f"{name}.inter"
    header = source.open().readline().rstrip("\n").split("\t")
    frame = pd.read_csv(source, sep="\t", dtype=str)
    fields = {column.split(":")[0]: column for column in header}
    user, item, time = fields["user_id"], fields["item_id"], fields["timestamp"]
    frame[time] = frame[time].astype(float)
    reordered = reorder_ties(frame, mode, user, item, time)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as tmp:
        reordered.to_csv(tmp, sep="\t", index=False)
    return target, tied_target_share(reordered, user, time)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, default=Path("dataset/amazon-beauty/amazon-beauty.inter")
    )
    parser.add_argument("--modes", default="reverse,popular-last")
    parser.add_argument(
        "--out", type=Path, help="dataset root (default: the source's parent's parent)"
    )
    args = parser.parse_args(argv)
    out_root = args.out or args.source.resolve().parent.parent
    for mode in args.modes.split(","):
        path, share = write_variant(args.source, mode.strip(), out_root)
        print(f"{path}: {100 * share:.1f}% tied test targets")


if __name__ == "__main__":
    main()
