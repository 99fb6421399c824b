"""RecBole atomic files: open (plain, gz, xz, bz2), check, and write all-or-nothing.

An atomic `.inter` file is tab-separated text whose first line names each column as
`name:type` (type one of RecBole's `token`, `float`, `token_seq`, `float_seq`), e.g.
`user_id:token  item_id:token  rating:float  timestamp:float`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from datatools.errors import DatasetError

FEATURE_TYPES = ("token", "float", "token_seq", "float_seq")  # RecBole's FeatureType values
COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
EXAMPLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


@dataclass
class AtomicSummary:
    """What an atomic file holds."""

    path: Path
    columns: list[str]  # header entries, `name:type`
    rows: int
    users: int | None = None  # None when not counted
    items: int | None = None
    time_min: float | None = None
    time_max: float | None = None


def open_text(path: Path) -> IO[str]:
    """Open a text file, decompressing .gz / .xz / .bz2 by suffix."""
    opener = COMPRESSED.get(path.suffix.lower())
    if opener is None:
        return open(path, encoding="utf-8", newline="")
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", newline="")


def base_name(path: Path) -> str:
    """File name without a compression suffix: 'ratings.csv.gz' -> 'ratings.csv'."""
    name = path.name
    for suffix in COMPRESSED:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def require_file(path: Path, what: str = "file") -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    if not path.is_file():
        raise DatasetError(f"{what} is not a file: {path}")
    return path


def parse_header(line: str, path: Path, separator: str = "\t") -> list[tuple[str, str]]:
    """Split a header line into (name, type) pairs; raise on anything RecBole would reject."""
    line = line.rstrip("\r\n")
    if not line.strip():
        raise DatasetError(
            f"{path}: the first line is empty; an atomic file starts with a header such as "
            f"{EXAMPLE_HEADER!r}"
        )
    fields = []
    for position, entry in enumerate(line.split(separator), start=1):
        name, colon, ftype = entry.partition(":")
        if not colon or not name or ftype not in FEATURE_TYPES:
            hint = ""
            if separator not in line and ("," in line or " " in line.strip()):
                hint = " (columns must be tab-separated)"
            raise DatasetError(
                f"{path}: header column {position} {entry!r} is not RecBole's name:type form"
                f"{hint}; types are {', '.join(FEATURE_TYPES)}, e.g. {EXAMPLE_HEADER!r}. "
                f"Header found: {line!r}"
            )
        fields.append((name, ftype))
    return fields


def read_header(path: Path, separator: str = "\t") -> list[tuple[str, str]]:
    require_file(path, "atomic file")
    with open_text(path) as handle:
        first = handle.readline()
    if not first:
        raise DatasetError(
            f"{path}: the file is empty; expected a header such as {EXAMPLE_HEADER!r} "
            "and one interaction per line"
        )
    return parse_header(first, path, separator)


def check_numbers(values: pd.Series, what: str, path: Path, first_line: int) -> np.ndarray:
    """`values` (strings) as float64; raise naming the line of the first entry that is not a
    finite number. `first_line` is the file line of index 0 of `values`."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(numbers)
    if bad.any():
        position = int(np.argmax(bad))
        raw = values.iloc[position]
        shown = repr(raw) if isinstance(raw, str) and raw.strip() else "empty or NaN"
        line = first_line + int(values.index[position])
        need = "; every interaction needs a timestamp in unix seconds" if "time" in what else ""
        raise DatasetError(f"{path}, line {line}: {what} is {shown}, not a number{need}")
    return numbers


def check_atomic_file(
    path: Path,
    *,
    required: tuple[str, ...] = ("user_id", "item_id"),
    time_field: str | None = "timestamp",
    separator: str = "\t",
    count: bool = True,
) -> AtomicSummary:
    """Check an atomic file the way RecBole will read it; raise DatasetError on the first problem.

    Checks: the file exists and is not empty; the header is `name:type`; the `required`
    columns and the float `time_field` exist; there is at least one interaction; every
    timestamp is a finite number. `count` also counts users and items (the first two
    `required` columns), which reads those columns too.
    """
    return load_atomic(path, required, time_field, separator, count)[0]


def load_atomic(
    path: Path,
    required: tuple[str, ...] = ("user_id", "item_id"),
    time_field: str | None = "timestamp",
    separator: str = "\t",
    count: bool = True,
) -> tuple[AtomicSummary, pd.DataFrame]:
    """`check_atomic_file`, also returning the columns it read (ids as categories)."""
    path = Path(path)
    header = read_header(path, separator)
    names = [name for name, _ in header]
    found = ", ".join(f"{name}:{ftype}" for name, ftype in header)
    if time_field is not None and time_field not in names:
        raise DatasetError(
            f"{path} has no '{time_field}' column: TiM4Rec needs a timestamp per interaction "
            f"(its time gaps, and the time-ordered split). Columns found: {found}. "
            f"Add a '{time_field}:float' column (unix seconds) or point TIME_FIELD at the "
            "time column."
        )
    missing = [name for name in required if name not in names]
    if missing:
        raise DatasetError(
            f"{path} lacks column(s) {', '.join(missing)} named by the configuration "
            f"(USER_ID_FIELD / ITEM_ID_FIELD / load_col). Columns found: {found}"
        )
    types = dict(header)
    if time_field is not None and types[time_field] != "float":
        raise DatasetError(
            f"{path}: column '{time_field}' is {time_field}:{types[time_field]}; the timestamp "
            f"must be {time_field}:float (unix seconds)"
        )
    # the user column is always read: it tells blank lines from rows lacking a timestamp
    ids = list(required[:2]) if count else list(required[:1])
    frame = read_columns(path, header, ids, time_field, separator)
    if len(frame) == 0:
        raise DatasetError(f"{path}: the header is there but the file holds no interactions")
    summary = AtomicSummary(path=path, columns=[f"{n}:{t}" for n, t in header], rows=len(frame))
    for name in ids:
        empty = frame[name].isna().to_numpy()
        if empty.any():
            raise DatasetError(
                f"{path}, line {2 + int(frame.index[np.argmax(empty)])}: {name} is empty"
            )
    if time_field is not None:
        times = frame[time_field].to_numpy()
        summary.time_min, summary.time_max = float(times.min()), float(times.max())
    if count:
        summary.users = int(frame[ids[0]].nunique())
        summary.items = int(frame[ids[1]].nunique())
    return summary, frame


def read_columns(
    path: Path,
    header: list[tuple[str, str]],
    ids: list[str],
    time_field: str | None,
    separator: str,
) -> pd.DataFrame:
    """Read the `ids` columns (as categories) and `time_field` (checked float64).

    Blank lines are read as empty rows and then dropped, so that index + 2 stays the file
    line. The time column is parsed as float64 first (little memory); on a value that is not
    a number it is read again as text to name the line and the value.
    """
    names = [name for name, _ in header]
    columns = [*ids, *([time_field] if time_field else [])]

    def read(time_dtype: str) -> pd.DataFrame:
        dtype = {name: "category" for name in ids}
        if time_field:
            dtype[time_field] = time_dtype
        with open_text(path) as handle:
            return pd.read_csv(
                handle,
                sep=separator,
                header=0,
                names=names,
                usecols=columns,
                dtype=dtype,
                quoting=csv.QUOTE_NONE,
                skip_blank_lines=False,
                engine="c",
            )

    try:
        try:
            frame = read("float64")
        except ValueError as err:
            if "convert" not in str(err) or not time_field:
                raise
            frame = read("str")
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, lzma.LZMAError, OSError) as err:
        raise DatasetError(
            f"{path}: cannot be read as a tab-separated atomic file: {err}"
        ) from None
    frame = frame.dropna(how="all")
    if time_field and len(frame):
        frame[time_field] = check_numbers(frame[time_field], time_field, path, first_line=2)
    return frame


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(target: Path) -> Iterator[IO[str]]:
    """Write `target` all-or-nothing: a temporary file in its folder, renamed on success.

    The folder is created if needed and removed again (when still empty) if writing fails.
    """
    folder = target.parent
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", dir=folder, prefix=f".{target.name}.", suffix=".tmp", delete=False, newline=""
    )
    try:
        with handle:
            yield handle
        os.chmod(handle.name, 0o666 & ~current_umask())  # as open() would have created it
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise


def tied_target_share(frame: pd.DataFrame, user: str, time_field: str) -> float:
    """Share of users whose last interaction has the same timestamp as the one before it.

    Under leave-one-out in time order, that last interaction is the test target. RecBole
    sorts by time with a stable sort, so the order of tied interactions, and with it
    which item becomes the target, is the file's row order (day-granular logs tie often).
    """
    users = frame[user].to_numpy()
    times = frame[time_field].to_numpy()
    codes = pd.factorize(users)[0]
    order = np.lexsort((times, codes))  # stable: ties keep the file's order
    codes, times = codes[order], times[order]
    last = np.flatnonzero(np.r_[codes[1:] != codes[:-1], True])  # each user's last row
    has_previous = last > 0
    last = last[has_previous]
    same_user = codes[last - 1] == codes[last]
    tied = same_user & (times[last - 1] == times[last])
    return float(tied.sum() / max(1, same_user.sum()))
