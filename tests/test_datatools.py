"""datatools: each raw format converted row by row, the real Amazon Beauty set, bad input."""

from __future__ import annotations

import bz2
import calendar
import gzip
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datatools import DatasetError, check_atomic_file, prepare
from datatools.atomic import atomic_output, tied_target_share
from datatools.cli import main
from datatools.prepare import k_core, prepare_command

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
BEAUTY = SHARED / "datasets" / "amazon-beauty" / "amazon-beauty.inter.xz"
HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def write(path: Path, text: str) -> Path:
    """Write `text`, compressed according to the suffix (.gz, .xz, .bz2)."""
    data = text.encode("utf-8")
    openers = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}
    path.write_bytes(openers.get(path.suffix, lambda b: b)(data))
    return path


def output_lines(out: Path, name: str) -> list[str]:
    return (out / name / f"{name}.inter").read_text().splitlines()


def run(name: str, raw, out: Path, **kwargs):
    """prepare() without the 5-core check (fixtures are tiny), output collected."""
    messages: list[str] = []
    kwargs.setdefault("core", 0)
    raw = raw if isinstance(raw, list) else [raw]
    report = prepare(name, raw, out=out, log=messages.append, **kwargs)
    return report, messages


# --- each raw format, row by row ---


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_movielens_dat(tmp_path, suffix):
    raw = write(
        tmp_path / f"ratings.dat{suffix}",
        "2::20::3::300\n1::10::5::978300760\n1::11::4::978300100\n10::10::2::100\n"
        "1::12::1::978300760\n",
    )
    report, messages = run("ml-1m", raw, tmp_path / "out")
    assert report.format == "ml-dat"
    # users in numeric order (1, 2, 10), then time; equal times keep file order
    assert output_lines(tmp_path / "out", "ml-1m") == [
        HEADER,
        "1\t11\t4.0\t978300100",
        "1\t10\t5.0\t978300760",
        "1\t12\t1.0\t978300760",
        "2\t20\t3.0\t300",
        "10\t10\t2.0\t100",
    ]
    assert (report.rows_read, report.rows, report.users, report.items) == (5, 5, 3, 4)
    assert any(line.startswith("wrote") and "5 rows, 3 users, 4 items" in line for line in messages)
    assert any(line.startswith("time    1970-01-01 .. 2000-12-31") for line in messages)


def test_movielens_csv(tmp_path):
    raw = write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n2,10,4.0,835355493\n"
        "1,1029,3.0,1260759179\n1,1061,3.5,1260759100\n",
    )
    report, _ = run("ml-latest-small", raw, tmp_path / "out")
    assert report.format == "ml-csv"
    assert output_lines(tmp_path / "out", "ml-latest-small") == [
        HEADER,
        "1\t1061\t3.5\t1260759100",
        "1\t31\t2.5\t1260759144",
        "1\t1029\t3.0\t1260759179",
        "2\t10\t4.0\t835355493",
    ]


@pytest.mark.parametrize("suffix", ["", ".xz", ".bz2"])
def test_amazon_csv(tmp_path, suffix):
    raw = write(
        tmp_path / f"ratings_Beauty.csv{suffix}",
        "A2XYZ,B0001,5.0,1400000000\nA1ABC,B0002,3.0,1300000000\nA1ABC,B0001,4.0,1200000000\n",
    )
    report, messages = run("amazon-beauty", raw, tmp_path / "out")
    assert report.format == "amazon-csv"
    assert output_lines(tmp_path / "out", "amazon-beauty") == [
        HEADER,
        "A1ABC\tB0001\t4.0\t1200000000",
        "A1ABC\tB0002\t3.0\t1300000000",
        "A2XYZ\tB0001\t5.0\t1400000000",
    ]
    assert "dropped 0 rows" in messages


def test_steam_reviews(tmp_path):
    reviews = [
        "{'username': 'bob', 'hours': 2.0, 'product_id': '200', 'date': '2017-12-18', "
        "'text': \"it's 'great'\", 'early_access': False}",
        "{'username': 'alice', 'product_id': '100', 'date': '2017-12-17', 'page': 1}",
        "{'username': 'bob', 'user_id': '765', 'product_id': '100', 'date': '2017-12-17'}",
        "{'product_id': '300', 'date': '2017-12-19'}",  # no username: dropped
        "{'username': 'bob', 'product_id': '200', 'date': '2017-12-18'}",  # repeat: kept
    ]
    raw = write(tmp_path / "steam_reviews.json.gz", "\n".join(reviews) + "\n")
    report, messages = run("steam", raw, tmp_path / "out")
    day = {d: calendar.timegm((2017, 12, d, 0, 0, 0)) for d in (17, 18)}
    assert output_lines(tmp_path / "out", "steam") == [
        "user_id:token\tproduct_id:token\trating:float\ttimestamp:float",
        f"alice\t100\t1.0\t{day[17]}",
        f"bob\t100\t1.0\t{day[17]}",
        f"bob\t200\t1.0\t{day[18]}",
        f"bob\t200\t1.0\t{day[18]}",
    ]
    assert report.rows_read == 5 and dict(report.dropped) == {"no username": 1}
    assert "dropped 1 rows: 1 no username" in messages


def kuairand_log(rows: list[tuple]) -> str:
    lines = ["user_id,video_id,date,hourmin,time_ms,is_click,is_like,play_time_ms"]
    lines += [f"{u},{v},20220408,1200,{t},{c},0,500" for u, v, t, c in rows]
    return "\n".join(lines) + "\n"


def test_kuairand_folder(tmp_path):
    data = tmp_path / "KuaiRand-Pure" / "data"
    data.mkdir(parents=True)
    write(
        data / "log_standard_4_08_to_4_21_pure.csv",
        kuairand_log(
            [(2, 7, 1649412412012, 1), (1, 5, 1649412400000, 0), (1, 6, 1649412500500, 1)]
        ),
    )
    write(data / "log_standard_4_22_to_5_08_pure.csv", kuairand_log([(1, 5, 1650485801301, 1)]))
    write(data / "log_random_4_22_to_5_08_pure.csv", kuairand_log([(1, 9, 1650485801000, 1)]))
    report, messages = run("kuairand", data.parent, tmp_path / "out")  # finds data/ below
    assert report.format == "kuairand"
    assert [p.name for p in report.sources] == [
        "log_standard_4_08_to_4_21_pure.csv",
        "log_standard_4_22_to_5_08_pure.csv",
    ]
    assert output_lines(tmp_path / "out", "kuairand") == [
        HEADER,
        "1\t6\t1.0\t1649412500.5",
        "1\t5\t1.0\t1650485801.301",
        "2\t7\t1.0\t1649412412.012",
    ]
    assert report.rows_read == 4 and dict(report.dropped) == {"not clicked (is_click == 0)": 1}
    # explicit files, the random log included when named
    report, _ = run("kuai2", sorted(data.glob("log_*.csv")), tmp_path / "out", fmt="kuairand")
    assert report.rows == 4


def test_atomic_file_is_checked_and_copied(tmp_path):
    text = f"{HEADER}\n1\t5\t1.0\t10\n1\t6\t1.0\t11.5\n2\t5\t1.0\t12\n"
    raw = write(tmp_path / "mine.inter.xz", text)
    report, messages = run("mine", raw, tmp_path / "out")
    assert report.format == "atomic"
    assert (tmp_path / "out" / "mine" / "mine.inter").read_text() == text
    assert (report.rows, report.users, report.items) == (3, 2, 2)
    assert (report.time_min, report.time_max) == (10.0, 12.0)


def test_k_core_matches_a_plain_peeling_loop():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, size=600).astype(str)
    items = rng.zipf(1.6, size=600).astype(str)
    keep = k_core(users, items, 5)
    alive = set(range(600))
    while True:  # reference: drop one offending interaction set at a time, users first
        user_count = pd.Series(users[list(alive)]).value_counts()
        bad_users = set(user_count[user_count < 5].index)
        alive = {i for i in alive if users[i] not in bad_users}
        item_count = pd.Series(items[list(alive)]).value_counts()
        bad_items = set(item_count[item_count < 5].index)
        alive = {i for i in alive if items[i] not in bad_items}
        if not bad_users and not bad_items:
            break
    assert set(np.flatnonzero(keep)) == alive
    assert 0 < keep.sum() < 600


def test_five_core_report(tmp_path):
    rows = [f"{u}\t{i}\t1.0\t{u * 10 + i}" for u in range(6) for i in range(5)]
    rows.append("99\t0\t1.0\t5")  # a user with one interaction: not in the 5-core
    raw = write(tmp_path / "dense.inter", HEADER + "\n" + "\n".join(rows) + "\n")
    report, messages = run("dense", raw, tmp_path / "out", core=5)
    assert report.core_counts == (30, 6, 5)
    assert any(line.startswith("5-core  30 rows, 6 users, 5 items") for line in messages)


# --- the real data in ../shared ---


@pytest.mark.skipif(not BEAUTY.is_file(), reason=f"needs {BEAUTY} (clone beside shared/)")
def test_real_amazon_beauty(tmp_path):
    report, messages = run("amazon-beauty", BEAUTY, tmp_path, core=5)
    assert (report.rows, report.users, report.items) == (198_502, 22_363, 12_101)
    assert report.core_counts == (198_502, 22_363, 12_101)  # already the 5-core set
    written = check_atomic_file(tmp_path / "amazon-beauty" / "amazon-beauty.inter")
    assert (written.rows, written.users, written.items) == (198_502, 22_363, 12_101)
    assert (
        "next    python run.py --config config/config4beauty_64d.yaml --data_path=" in messages[-1]
    )


# --- command line ---


def test_cli_prepare_and_check(tmp_path, capsys):
    raw = write(tmp_path / "ratings.dat", "1::10::5::100\n1::11::4::50\n")
    out = tmp_path / "out"
    assert main(["prepare", "ml-tiny", str(raw), "--out", str(out), "--core", "0"]) == 0
    printed = capsys.readouterr().out
    assert "ratings.dat (ml-dat): 2 rows" in printed and "1 users, 2 items" in printed
    assert output_lines(out, "ml-tiny")[1] == "1\t11\t4.0\t50"
    # a second run refuses to replace the file unless --force
    assert main(["prepare", "ml-tiny", str(raw), "--out", str(out), "--core", "0"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["prepare", "ml-tiny", str(raw), "--out", str(out), "--core=0", "--force"]) == 0
    assert main(["check", str(out / "ml-tiny" / "ml-tiny.inter")]) == 0
    printed = capsys.readouterr().out
    assert "2 rows, 1 users, 2 items" in printed and "ties    0.0%" in printed


def test_tied_target_share_counts_last_interactions_tied_with_the_one_before():
    frame = pd.DataFrame(
        {  # user a: last two on day 5 (tied); b: no tie; c: one row only (not counted)
            "user_id": ["a", "b", "a", "b", "a", "c"],
            "timestamp": [5.0, 1.0, 1.0, 2.0, 5.0, 9.0],
        }
    )
    assert tied_target_share(frame, "user_id", "timestamp") == 0.5


def test_cli_help_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "datatools", "prepare", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "amazon-csv" in result.stdout and "steam_reviews.json.gz" in result.stdout


def test_missing_dataset_command_names_raw_file():
    assert prepare_command("amazon-beauty") == (
        "python -m datatools prepare amazon-beauty ratings_Beauty.csv"
    )
    assert prepare_command("other", Path("/data")) == (
        "python -m datatools prepare other <raw file> --out /data"
    )


# --- bad input: one clear error each, nothing written ---


def fails(tmp_path, name: str, raw, match: str, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=match):
        run(name, raw, out, **kwargs)
    assert not out.exists() or not any(out.rglob("*")), "nothing may be written on error"


def test_error_missing_file(tmp_path):
    fails(tmp_path, "x", tmp_path / "nope.csv", r"raw file not found: .*nope\.csv")


def test_error_missing_timestamp_column(tmp_path):
    raw = write(tmp_path / "a.inter", "user_id:token\titem_id:token\n1\t2\n")
    fails(
        tmp_path,
        "a",
        raw,
        r"has no 'timestamp' column: TiM4Rec needs a timestamp per interaction .*"
        r"Columns found: user_id:token, item_id:token",
    )


def test_error_non_numeric_timestamp(tmp_path):
    raw = write(tmp_path / "a.inter", f"{HEADER}\n1\t2\t1\t10\n1\t3\t1\tyesterday\n")
    fails(tmp_path, "a", raw, r"a\.inter, line 3: timestamp is 'yesterday', not a number")


def test_error_nan_timestamp(tmp_path):
    raw = write(tmp_path / "a.inter", f"{HEADER}\n1\t2\t1\t10\n\n1\t3\t1\tNaN\n")
    fails(tmp_path, "a", raw, r"line 4: timestamp is empty or NaN, not a number")


def test_error_non_numeric_timestamp_in_raw_csv(tmp_path):
    raw = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.0,soon\n")
    fails(tmp_path, "ml", raw, r"ratings\.csv, line 2: timestamp is 'soon', not a number")


def test_error_empty_file(tmp_path):
    fails(tmp_path, "a", write(tmp_path / "a.inter", ""), r"a\.inter: the file is empty")
    fails(tmp_path, "b", write(tmp_path / "b.csv", ""), r"b\.csv: the file is empty")


def test_error_header_only(tmp_path):
    raw = write(tmp_path / "a.inter", HEADER + "\n")
    fails(tmp_path, "a", raw, r"the header is there but the file holds no interactions")


def test_error_header_not_name_type(tmp_path):
    raw = write(tmp_path / "a.inter", "user_id\titem_id\ttimestamp\n1\t2\t3\n")
    fails(
        tmp_path,
        "a",
        raw,
        r"header column 1 'user_id' is not RecBole's name:type form; types are token, float",
    )
    raw = write(tmp_path / "b.inter", "user_id:token,item_id:token,timestamp:float\n1,2,3\n")
    fails(tmp_path, "b", raw, r"\(columns must be tab-separated\)")


def test_error_left_empty_by_five_core(tmp_path):
    raw = write(tmp_path / "ratings.dat", "1::10::5::100\n1::11::4::50\n2::10::3::70\n")
    fails(
        tmp_path,
        "ml-tiny",
        raw,
        r"left empty by the 5-core filter .* 3 rows, 2 users, 2 items",
        core=5,
    )


def test_error_unknown_format(tmp_path):
    raw = write(tmp_path / "ratings.txt", "1 2 3\n")
    fails(tmp_path, "x", raw, r"cannot tell the format .* pass --format, one of ml-dat")


def test_error_steam_line_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    line = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    raw = write(tmp_path / "steam_reviews.json", line + "\n")
    fails(tmp_path, "steam", raw, r"line 1: not a Python dict literal")
    assert not marker.exists()


def test_error_steam_bad_date(tmp_path):
    raw = write(tmp_path / "s.json", "{'username': 'a', 'product_id': '1', 'date': 'May 2017'}\n")
    fails(tmp_path, "steam", raw, r"line 1: date 'May 2017' is not YYYY-MM-DD")


def test_error_kuairand_missing_column(tmp_path):
    raw = write(tmp_path / "log_standard_x.csv", "user_id,video_id,is_click\n1,2,1\n")
    fails(tmp_path, "kuairand", raw, r"column\(s\) time_ms missing; columns found: user_id,")


def test_error_amazon_with_header(tmp_path):
    raw = write(tmp_path / "r.csv", "user,item,rating,unix_time\nA,B,5.0,1400000000\n")
    fails(tmp_path, "amazon-x", raw, r"line 1: .* looks like a header")


def test_error_all_rows_dropped(tmp_path):
    raw = write(tmp_path / "log_standard_a.csv", kuairand_log([(1, 2, 1000, 0)]))
    fails(tmp_path, "kuairand", raw, r"all dropped \(1 not clicked")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "new" / "x.inter"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as handle:
            handle.write("partial")
            raise RuntimeError("disk full")
    assert not (tmp_path / "new").exists()
