"""`prepare`: raw download -> `<out>/<dataset>/<dataset>.inter`, checked, all-or-nothing."""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datatools.atomic import atomic_output, load_atomic, open_text, read_header
from datatools.errors import DatasetError
from datatools.formats import FORMATS, detect_format

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "dataset"
CONFIG_DIR = REPO_ROOT / "config"
DEFAULT_CORE = 5  # config/defaults.yaml: user/item_inter_num_interval "[5,inf)"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# The paper's datasets: the raw file each is published as (see dataset/README.md).
KNOWN_DATASETS = {
    "amazon-beauty": "ratings_Beauty.csv",
    "ml-1m": "ratings.dat",
    "kuairand": "KuaiRand-Pure/data/",
    "steam": "steam_reviews.json.gz",
    "ml-latest-small": "ratings.csv",
}


@dataclass
class PrepareReport:
    """What `prepare` read and wrote."""

    dataset: str
    format: str
    sources: list[Path]
    output: Path
    rows_read: int
    rows: int  # rows written
    users: int
    items: int
    time_min: float
    time_max: float
    dropped: Counter = field(default_factory=Counter)
    core: int = DEFAULT_CORE
    core_counts: tuple[int, int, int] | None = None  # rows, users, items after the k-core

    def lines(self) -> list[str]:
        lines = [
            f"read    {', '.join(map(shown, self.sources))} ({self.format}): {self.rows_read:,} rows"
        ]
        if self.dropped:
            reasons = "; ".join(f"{n:,} {why}" for why, n in self.dropped.most_common())
            lines.append(f"dropped {sum(self.dropped.values()):,} rows: {reasons}")
        else:
            lines.append("dropped 0 rows")
        lines.append(
            f"wrote   {shown(self.output)}: {self.rows:,} rows, {self.users:,} users, "
            f"{self.items:,} items"
        )
        lines.append(f"time    {day(self.time_min)} .. {day(self.time_max)} (UTC)")
        if self.core_counts:
            rows, users, items = self.core_counts
            lines.append(
                f"{self.core}-core  {rows:,} rows, {users:,} users, {items:,} items: what training "
                f'keeps (user/item_inter_num_interval "[{self.core},inf)")'
            )
        return lines


def shown(path: Path) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def day(seconds: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def prepare_command(dataset: str, out: Path | None = None) -> str:
    """The command that prepares `dataset` (used in 'dataset not found' messages)."""
    command = f"python -m datatools prepare {dataset} {KNOWN_DATASETS.get(dataset, '<raw file>')}"
    if out is not None and Path(out).resolve() != DEFAULT_OUT.resolve():
        command += f" --out {out}"
    return command


def run_configs(dataset: str) -> list[Path]:
    """config/config4*.yaml files that train on `dataset`."""
    pattern = re.compile(rf"^dataset:\s*['\"]?{re.escape(dataset)}['\"]?\s*(#.*)?$", re.M)
    return [p for p in sorted(CONFIG_DIR.glob("config4*.yaml")) if pattern.search(p.read_text())]


def next_command(dataset: str, out: Path) -> str:
    data_path = "" if out.resolve() == DEFAULT_OUT.resolve() else f" --data_path={out}"
    configs = run_configs(dataset)
    if configs:
        return " | ".join(
            f"python run.py --config {p.relative_to(REPO_ROOT)}{data_path}" for p in configs
        )
    return f"python run.py --dataset={dataset}{data_path}"


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the interactions RecBole keeps with user/item_inter_num_interval "[k,inf)".

    RecBole drops users and items with fewer than k interactions until none is left; the
    result (the k-core) does not depend on the order of removal.
    """
    user_codes, user_index = pd.factorize(users)
    item_codes, item_index = pd.factorize(items)
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_count = np.bincount(user_codes[keep], minlength=len(user_index))
        item_count = np.bincount(item_codes[keep], minlength=len(item_index))
        still = keep & (user_count[user_codes] >= k) & (item_count[item_codes] >= k)
        if still.sum() == keep.sum():
            return still
        keep = still


def sort_by_user_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Stable sort by user (numerically when all ids are integers), then timestamp."""
    users = frame["user"]
    if users.str.fullmatch(r"\d{1,18}").all():
        users = users.astype(np.int64)
    user_rank = pd.factorize(users, sort=True)[0]
    order = np.lexsort((frame["timestamp"].to_numpy(), user_rank))
    return frame.iloc[order].reset_index(drop=True)


def time_text(values: np.ndarray) -> np.ndarray | pd.Series:
    """Whole seconds as integers ('978300760'), else Python's shortest float text."""
    if np.all(values == np.floor(values)) and np.abs(values).max(initial=0) < 2**53:
        return values.astype(np.int64)
    return pd.Series(values).map(repr)


def check_target(dataset: str, out: Path, force: bool) -> Path:
    if not NAME_PATTERN.match(dataset):
        raise DatasetError(
            f"dataset name {dataset!r} must be a plain folder name (letters, digits, '.', '_', '-')"
        )
    target = out / dataset / f"{dataset}.inter"
    if target.exists() and not force:
        raise DatasetError(f"{target} already exists; pass --force to replace it")
    return target


def choose_format(paths: list[Path], fmt: str | None) -> str:
    for path in paths:
        if not path.exists():
            raise DatasetError(f"raw file not found: {path}")
    if fmt is None:
        fmt = detect_format(paths)
        if fmt is None:
            raise DatasetError(
                f"cannot tell the format of {', '.join(map(str, paths))}; pass --format, one of "
                + ", ".join(FORMATS)
                + " (python -m datatools prepare --help describes them)"
            )
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if len(paths) > 1 and not FORMATS[fmt].many_files:
        raise DatasetError(f"format {fmt} reads one file; got {len(paths)}")
    return fmt


def prepare(
    dataset: str,
    raw: list[str | Path],
    *,
    out: str | Path = DEFAULT_OUT,
    fmt: str | None = None,
    force: bool = False,
    core: int = DEFAULT_CORE,
    log: Callable[[str], None] = print,
) -> PrepareReport:
    """Convert `raw` into `<out>/<dataset>/<dataset>.inter` and return what was done.

    Nothing is written when anything is wrong: the output goes to a temporary file in the
    target folder and is renamed into place only after every check passed.
    """
    paths = [Path(p).expanduser() for p in raw]
    out = Path(out).expanduser()
    if not paths:
        raise DatasetError("no raw file given")
    fmt = choose_format(paths, fmt)
    target = check_target(dataset, out, force)
    log(f"reading {', '.join(map(shown, paths))} as {fmt} ...")
    if fmt == "atomic":
        return copy_atomic(dataset, paths[0], target, core, log)

    data = FORMATS[fmt].reader(paths)
    frame = data.frame
    sources = ", ".join(map(str, data.sources))
    if data.rows_read == 0:
        raise DatasetError(f"{sources}: the file is empty (no interactions)")
    if len(frame) == 0:
        why = "; ".join(f"{n:,} {reason}" for reason, n in data.dropped.items())
        raise DatasetError(f"{sources}: no interactions left to write: all dropped ({why})")
    frame = sort_by_user_time(frame)
    report = PrepareReport(
        dataset=dataset,
        format=fmt,
        sources=data.sources,
        output=target,
        rows_read=data.rows_read,
        rows=len(frame),
        users=int(frame["user"].nunique()),
        items=int(frame["item"].nunique()),
        time_min=float(frame["timestamp"].min()),
        time_max=float(frame["timestamp"].max()),
        dropped=data.dropped,
        core=core,
    )
    report.core_counts = core_counts(frame["user"].to_numpy(), frame["item"].to_numpy(), report)
    header = f"user_id:token\t{FORMATS[fmt].item_field}:token\trating:float\ttimestamp:float\n"
    table = pd.DataFrame(
        {
            "user": frame["user"],
            "item": frame["item"],
            "rating": frame["rating"],
            "timestamp": time_text(frame["timestamp"].to_numpy()),
        }
    )
    with atomic_output(target) as handle:
        handle.write(header)
        table.to_csv(handle, sep="\t", header=False, index=False, lineterminator="\n")
    for line in report.lines():
        log(line)
    log(f"next    {next_command(dataset, out)}")
    return report


def core_counts(
    users: np.ndarray, items: np.ndarray, report: PrepareReport
) -> tuple[int, int, int] | None:
    """(rows, users, items) left by the k-core; raise when it leaves nothing."""
    if report.core <= 0:
        return None
    keep = k_core(users, items, report.core)
    counts = (int(keep.sum()), len(pd.unique(users[keep])), len(pd.unique(items[keep])))
    if counts[0] == 0:
        raise DatasetError(
            f"the dataset is left empty by the {report.core}-core filter that training applies "
            f'(user_inter_num_interval / item_inter_num_interval "[{report.core},inf)" in '
            f"config/defaults.yaml): no user and item keep {report.core} interactions each among "
            f"{report.rows:,} rows, {report.users:,} users, {report.items:,} items. Use the full "
            "raw data, or pass --core 0 and lower those intervals in your config"
        )
    return counts


def copy_atomic(
    dataset: str, path: Path, target: Path, core: int, log: Callable[[str], None]
) -> PrepareReport:
    """Check an atomic file, then copy it (decompressed) as `target`."""
    names = [name for name, _ in read_header(path)]
    item_field = next((n for n in ("item_id", "product_id") if n in names), "item_id")
    summary, frame = load_atomic(path, required=("user_id", item_field))
    if path.resolve() == target.resolve():
        raise DatasetError(f"{path} is already the prepared file")
    report = PrepareReport(
        dataset=dataset,
        format="atomic",
        sources=[path],
        output=target,
        rows_read=summary.rows,
        rows=summary.rows,
        users=summary.users,
        items=summary.items,
        time_min=summary.time_min,
        time_max=summary.time_max,
        core=core,
    )
    report.core_counts = core_counts(
        frame["user_id"].to_numpy(), frame[item_field].to_numpy(), report
    )
    with open_text(path) as source, atomic_output(target) as handle:
        shutil.copyfileobj(source, handle, length=1 << 20)
    for line in report.lines():
        log(line)
    log(f"next    {next_command(dataset, target.parent.parent)}")
    return report
