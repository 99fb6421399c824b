"""Top-k items per user from a checkpoint: `python recommend.py --checkpoint F --output top10.csv`.

Rebuilds the checkpoint's dataset (the data must be where training read it, or pass
--data_path=...) and writes user_id, rank, item_id, score rows with the data's own ids.
docs/recommend.md has the details; `python recommend.py -h` lists the options.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.config import ConfigError, parse_value
from pipeline.inference import FORMATS, InferenceError, export_recommendations
from pipeline.runner import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python recommend.py",
        description="Write the top-k items of each user (raw ids, with scores) to CSV or Parquet.",
        epilog="Other --key=value arguments override config keys, e.g. --data_path=dataset/.",
        allow_abbrev=False,  # --k must never swallow a config override such as --key=...
    )
    parser.add_argument("--checkpoint", required=True, help="saved/<file>.pth from run.py")
    parser.add_argument("--output", required=True, help="file to write (.csv or .parquet)")
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--users", help="comma-separated raw user ids (default: every user)")
    who.add_argument("--users-file", help="a file of raw user ids, one per line")
    parser.add_argument(
        "--exclude-history",
        action="store_true",
        help="never recommend an item the user already interacted with",
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="users scored at a time")
    parser.add_argument(
        "--format", choices=FORMATS, help="output format (default: from the file name, else csv)"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Options and `--key=value` config overrides; paths made absolute against the caller's
    directory (the pipeline later moves to the repository root)."""
    args, rest = build_parser().parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, eq, value = item[2:].partition("=") if item.startswith("--") else ("", "", "")
        if not key or not eq:
            raise ConfigError(f"unexpected argument {item!r}: config overrides are --key=value")
        overrides[key] = parse_value(value)
    if isinstance(overrides.get("data_path"), str):
        overrides["data_path"] = os.path.abspath(overrides["data_path"])
    args.checkpoint = os.path.abspath(args.checkpoint)
    args.output = os.path.abspath(args.output)
    return args, overrides


def read_users(args: argparse.Namespace) -> list[str] | None:
    if args.users is not None:
        return [user.strip() for user in args.users.split(",") if user.strip()]
    if args.users_file is not None:
        try:
            with open(args.users_file, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        except OSError as err:
            raise ConfigError(
                f"cannot read --users-file {args.users_file}: {err.strerror}"
            ) from None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse(argv)
        summary = export_recommendations(
            args.checkpoint,
            args.output,
            k=args.k,
            users=read_users(args),
            exclude_history=args.exclude_history,
            batch_size=args.batch_size,
            file_format=args.format,
            device=args.device,
            overrides=overrides,
        )
    except (*USER_ERRORS, InferenceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['rows']} rows for {summary['users']} users to {summary['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
