"""Readers for the raw formats the paper's datasets are published in.

Each reader returns a `RawData`: one row per interaction with columns user, item (text),
rating and timestamp (float64, unix seconds), in file order, plus how many rows were read
and how many were dropped for which reason. A malformed row raises DatasetError naming the
file and line.
"""

from __future__ import annotations

import ast
import calendar
import csv
import lzma
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datatools.atomic import base_name, check_numbers, open_text, require_file
from datatools.errors import DatasetError

COLUMNS = ["user", "item", "rating", "timestamp"]
KUAIRAND_GLOB = "log_standard_*.csv*"  # KuaiRand-Pure's standard (non-random) logs


@dataclass
class RawData:
    frame: pd.DataFrame  # columns COLUMNS
    sources: list[Path]
    rows_read: int
    dropped: Counter = field(default_factory=Counter)  # reason -> rows


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    reader: Callable[[list[Path]], RawData] | None  # None: atomic files are checked and copied
    item_field: str = "item_id"  # item column name in the written atomic file
    many_files: bool = False  # accepts several files or a folder


def read_csv_checked(path: Path, **kwargs) -> pd.DataFrame:
    """pandas.read_csv (compression by suffix) with parse errors as DatasetError."""
    try:
        return pd.read_csv(
            path, dtype=str, keep_default_na=False, skip_blank_lines=False, engine="c", **kwargs
        )
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot be read as CSV: {err}") from None
    except (EOFError, lzma.LZMAError, OSError) as err:
        raise DatasetError(f"{path}: cannot be decompressed or read: {err}") from None


def drop_blank(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop blank lines (all fields empty); the index keeps counting file lines."""
    return frame[~(frame.isna() | (frame == "")).all(axis=1)]


def check_ids(frame: pd.DataFrame, columns: dict[str, str], path: Path, first_line: int) -> None:
    """Raise naming the line of the first empty id; `columns` maps frame column -> file name."""
    for column, name in columns.items():
        empty = (frame[column].fillna("").str.strip() == "").to_numpy()
        if empty.any():
            line = first_line + int(frame.index[np.argmax(empty)])
            raise DatasetError(f"{path}, line {line}: {name} is empty")


def finish(frame: pd.DataFrame, path: Path, first_line: int, names: dict[str, str]) -> pd.DataFrame:
    """Check a text frame with columns COLUMNS (`names`: their names in the file); return it
    typed: ids as text, rating and timestamp as float64."""
    check_ids(frame, {"user": names["user"], "item": names["item"]}, path, first_line)
    return pd.DataFrame(
        {
            "user": frame["user"].to_numpy(),
            "item": frame["item"].to_numpy(),
            "rating": check_numbers(frame["rating"], names["rating"], path, first_line),
            "timestamp": check_numbers(frame["timestamp"], names["timestamp"], path, first_line),
        }
    )


def require_columns(found: list[str], wanted: list[str], path: Path, what: str) -> None:
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DatasetError(
            f"{path}: not a {what}: column(s) {', '.join(missing)} missing; "
            f"columns found: {', '.join(found) or '(none)'}"
        )


def single(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise DatasetError(f"{what} is one file; got {len(paths)} paths")
    return require_file(paths[0], "raw file")


def read_movielens_dat(paths: list[Path]) -> RawData:
    """MovieLens-1M / 10M `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header."""
    path = single(paths, "MovieLens ratings.dat")
    rows, lines = [], []
    with open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("::")
                if len(parts) != 4:
                    raise DatasetError(
                        f"{path}, line {number}: expected UserID::MovieID::Rating::Timestamp, "
                        f"got {line.strip()[:80]!r}"
                    )
                rows.append(parts)
                lines.append(number)
        except (UnicodeDecodeError, EOFError, lzma.LZMAError, OSError) as err:
            raise DatasetError(f"{path}: cannot be read: {err}") from None
    frame = pd.DataFrame(rows, columns=COLUMNS, index=np.asarray(lines, dtype=np.int64) - 1)
    names = {"user": "UserID", "item": "MovieID", "rating": "Rating", "timestamp": "Timestamp"}
    return RawData(finish(frame, path, 1, names), [path], len(rows))


def read_movielens_csv(paths: list[Path]) -> RawData:
    """MovieLens CSV releases (ml-latest, ml-20m, ...): `ratings.csv` with a header row."""
    path = single(paths, "MovieLens ratings.csv")
    frame = drop_blank(read_csv_checked(require_file(path, "raw file")))
    wanted = ["userId", "movieId", "rating", "timestamp"]
    require_columns(list(frame.columns), wanted, path, "MovieLens ratings.csv")
    frame = frame[wanted].set_axis(COLUMNS, axis=1)
    return RawData(finish(frame, path, 2, dict(zip(COLUMNS, wanted))), [path], len(frame))


def read_amazon_csv(paths: list[Path]) -> RawData:
    """Amazon 2014 ratings-only CSV (`ratings_<Category>.csv`): user,item,rating,unix_time."""
    path = single(paths, "Amazon ratings CSV")
    frame = drop_blank(read_csv_checked(require_file(path, "raw file"), header=None))
    if frame.shape[1] != 4:
        raise DatasetError(
            f"{path}: an Amazon ratings-only CSV has 4 columns (user,item,rating,unix_time, "
            f"no header); this file has {frame.shape[1]}"
        )
    frame = frame.set_axis(COLUMNS, axis=1)
    if len(frame) and check_is_header(frame.iloc[0]):
        raise DatasetError(
            f"{path}, line 1: {','.join(frame.iloc[0])!r} looks like a header; the Amazon "
            "ratings-only CSV has none (for MovieLens ratings.csv pass --format ml-csv)"
        )
    names = {"user": "user", "item": "item", "rating": "rating", "timestamp": "unix_time"}
    return RawData(finish(frame, path, 1, names), [path], len(frame))


def check_is_header(row: pd.Series) -> bool:
    try:
        float(row["timestamp"])
        return False
    except ValueError:
        return not any(ch.isdigit() for ch in row["timestamp"])


def read_steam(paths: list[Path]) -> RawData:
    """Steam reviews (`steam_reviews.json.gz`, Kang & McAuley): one Python dict literal a line.

    User = `username`, item = `product_id`, time = `date` (YYYY-MM-DD) at 00:00 UTC, rating
    1.0 (a review is an implicit interaction). Every review is kept, repeats included, like
    RecBole's processed (not merged) Steam set. Lines are parsed with ast.literal_eval: the
    file is Python syntax, not JSON, and is never executed.
    """
    path = single(paths, "Steam reviews")
    require_file(path, "raw file")
    users, items, times, dropped = [], [], [], Counter()
    day_seconds: dict[str, float] = {}
    rows_read = 0
    with open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                rows_read += 1
                if rows_read % 1_000_000 == 0:  # the full file has ~7.8M reviews: minutes
                    print(f"  {rows_read:,} reviews read", file=sys.stderr, flush=True)
                try:
                    review = ast.literal_eval(line)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    review = None
                if not isinstance(review, dict):
                    raise DatasetError(
                        f"{path}, line {number}: not a Python dict literal: {line.strip()[:80]!r}"
                    )
                username, product = review.get("username"), review.get("product_id")
                if username in (None, ""):
                    dropped["no username"] += 1
                    continue
                if product in (None, ""):
                    dropped["no product_id"] += 1
                    continue
                date = review.get("date")
                if date not in day_seconds:
                    day_seconds[date] = steam_day(date, path, number)
                users.append(str(username))
                items.append(str(product))
                times.append(day_seconds[date])
        except (UnicodeDecodeError, EOFError, lzma.LZMAError, OSError) as err:
            raise DatasetError(f"{path}: cannot be read: {err}") from None
    frame = pd.DataFrame(
        {
            "user": users,
            "item": items,
            "rating": np.ones(len(users)),
            "timestamp": np.asarray(times, dtype=np.float64),
        }
    )
    return RawData(frame, [path], rows_read, dropped)


def steam_day(date, path: Path, line: int) -> float:
    try:
        return float(calendar.timegm(time.strptime(str(date), "%Y-%m-%d")))
    except ValueError:
        raise DatasetError(
            f"{path}, line {line}: date {date!r} is not YYYY-MM-DD; every review needs a date "
            "(TiM4Rec's timestamps)"
        ) from None


def kuairand_files(paths: list[Path]) -> list[Path]:
    """Folders expand to their `log_standard_*.csv` files (the random-exposure logs are left out)."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob(KUAIRAND_GLOB)) or sorted(path.glob(f"*/{KUAIRAND_GLOB}"))
            if not found:
                listing = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "(empty)"
                raise DatasetError(
                    f"{path}: no {KUAIRAND_GLOB} files in this folder (found: {listing}); pass "
                    "KuaiRand-Pure's data/ folder or the log files themselves"
                )
            files.extend(found)
        else:
            files.append(require_file(path, "raw file"))
    return files


def read_kuairand(paths: list[Path]) -> RawData:
    """KuaiRand-Pure logs (`log_standard_*_pure.csv`): clicked videos, time from `time_ms`.

    User = `user_id`, item = `video_id`, rating 1.0, timestamp = time_ms / 1000 (seconds).
    Rows with is_click == 0 (shown, not clicked) are dropped.
    """
    wanted = ["user_id", "video_id", "time_ms", "is_click"]
    parts, dropped, rows_read = [], Counter(), 0
    files = kuairand_files(paths)
    for path in files:
        header = read_csv_checked(path, nrows=0)
        require_columns(list(header.columns), wanted, path, "KuaiRand log")
        frame = drop_blank(read_csv_checked(path, usecols=wanted))
        rows_read += len(frame)
        click = check_numbers(frame["is_click"], "is_click", path, first_line=2)
        keep = click == 1
        dropped["not clicked (is_click == 0)"] += int((click == 0).sum())
        other = ~keep & (click != 0)
        if other.any():
            line = 2 + int(frame.index[np.argmax(other)])
            raise DatasetError(f"{path}, line {line}: is_click must be 0 or 1")
        frame = frame[keep]
        check_ids(frame, {"user_id": "user_id", "video_id": "video_id"}, path, first_line=2)
        part = pd.DataFrame(
            {
                "user": frame["user_id"].to_numpy(),
                "item": frame["video_id"].to_numpy(),
                "rating": np.ones(len(frame)),
                "timestamp": check_numbers(frame["time_ms"], "time_ms", path, 2) / 1000.0,
            }
        )
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    return RawData(frame, files, rows_read, dropped)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "ml-dat",
            "MovieLens-1M/10M ratings.dat (UserID::MovieID::Rating::Timestamp)",
            read_movielens_dat,
        ),
        Format(
            "ml-csv",
            "MovieLens CSV ratings.csv (userId,movieId,rating,timestamp)",
            read_movielens_csv,
        ),
        Format(
            "amazon-csv",
            "Amazon 2014 ratings-only CSV (user,item,rating,unix_time; no header)",
            read_amazon_csv,
        ),
        Format(
            "steam",
            "Steam steam_reviews.json.gz (Python dict per line)",
            read_steam,
            item_field="product_id",
        ),
        Format(
            "kuairand",
            "KuaiRand-Pure log_standard_*_pure.csv files or their folder",
            read_kuairand,
            many_files=True,
        ),
        Format("atomic", "a RecBole atomic .inter file (checked, then copied)", None),
    )
}


def sniff_csv(path: Path) -> str | None:
    """Tell the CSV formats apart by their first line."""
    try:
        with open_text(path) as handle:
            first = handle.readline()
    except (UnicodeDecodeError, EOFError, lzma.LZMAError, OSError) as err:
        raise DatasetError(f"{path}: cannot be read: {err}") from None
    if not first.strip():
        raise DatasetError(f"{path}: the file is empty (or starts with a blank line)")
    fields = next(csv.reader([first]), [])
    if {"userId", "movieId"} <= set(fields):
        return "ml-csv"
    if "video_id" in fields:  # KuaiRand logs; missing columns are reported by the reader
        return "kuairand"
    if len(fields) == 4:
        return "amazon-csv"
    return None


def detect_format(paths: list[Path]) -> str | None:
    """The format of the raw input, from file names and first lines; None when unclear."""
    if any(path.is_dir() for path in paths):
        return "kuairand"
    formats = set()
    for path in paths:
        name = base_name(path).lower()
        if name.endswith(".inter"):
            formats.add("atomic")
        elif name.endswith(".dat"):
            formats.add("ml-dat")
        elif name.endswith(".json"):
            formats.add("steam")
        elif name.endswith(".csv") and path.is_file():
            formats.add(sniff_csv(path))
        else:
            formats.add(None)
    return formats.pop() if len(formats) == 1 else None
