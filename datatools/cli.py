"""`python -m datatools prepare|check ...`: the command line of the data tools."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datatools.atomic import load_atomic, read_header, tied_target_share
from datatools.errors import DatasetError
from datatools.formats import FORMATS
from datatools.prepare import DEFAULT_CORE, DEFAULT_OUT, KNOWN_DATASETS, day, prepare, shown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datatools",
        description="Turn raw public datasets into RecBole atomic files for TiM4Rec.",
        epilog="Example: python -m datatools prepare amazon-beauty ratings_Beauty.csv, then "
        "python run.py --config config/config4beauty_64d.yaml (see dataset/README.md)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    formats = "\n".join(f"  {name:<11} {f.description}" for name, f in FORMATS.items())
    known = "\n".join(f"  {name:<16} {raw}" for name, raw in KNOWN_DATASETS.items())
    prep = commands.add_parser(
        "prepare",
        help="convert a raw download into <out>/<dataset>/<dataset>.inter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a raw download into <out>/<dataset>/<dataset>.inter "
        "(user_id, item_id, rating, timestamp; sorted by user, then time). Inputs may be "
        ".gz/.xz/.bz2-compressed. Nothing is written when a check fails.",
        epilog=f"formats (guessed from the file when --format is not given):\n{formats}\n\n"
        f"the paper's datasets and their raw files:\n{known}",
    )
    prep.add_argument("dataset", help="dataset name, e.g. amazon-beauty, ml-1m, kuairand, steam")
    prep.add_argument("raw", nargs="+", help="raw file(s); for kuairand also a folder")
    prep.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder that receives <dataset>/ (default: {shown(DEFAULT_OUT)}, where run.py looks)",
    )
    prep.add_argument("--format", choices=list(FORMATS), help="raw format (default: guessed)")
    prep.add_argument("--force", action="store_true", help="replace an existing output file")
    prep.add_argument(
        "--core",
        type=int,
        default=DEFAULT_CORE,
        help=f"k of the k-core filter training applies, for the report and the empty check "
        f"(default {DEFAULT_CORE}; 0 skips it)",
    )

    check = commands.add_parser("check", help="check a RecBole atomic .inter file")
    check.add_argument("file", type=Path, help="the .inter file (may be compressed)")
    check.add_argument("--time-field", default="timestamp", help="time column (default timestamp)")
    return parser


def run_check(path: Path, time_field: str) -> None:
    names = [name for name, _ in read_header(path)]
    item = next((n for n in ("item_id", "product_id") if n in names), "item_id")
    summary, frame = load_atomic(path, required=("user_id", item), time_field=time_field)
    print(f"ok      {shown(path)}: columns {', '.join(summary.columns)}")
    print(f"        {summary.rows:,} rows, {summary.users:,} users, {summary.items:,} items")
    print(f"time    {day(summary.time_min)} .. {day(summary.time_max)} (UTC)")
    tied = tied_target_share(frame, "user_id", time_field)
    print(
        f"ties    {100 * tied:.1f}% of users' last interactions (the leave-one-out test "
        "targets) share their timestamp with the interaction before; the file's row order "
        "decides which of them is the target"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(
                args.dataset,
                args.raw,
                out=args.out,
                fmt=args.format,
                force=args.force,
                core=args.core,
            )
        else:
            run_check(args.file, args.time_field)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
