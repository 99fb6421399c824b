"""benchmarks/tie_order.py: same-timestamp rows reordered, everything else kept."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.tie_order import reorder_ties


def _frame() -> pd.DataFrame:
    # user u: items a, b, c on day 1 (file order a, b, c), then d on day 2; user v: b alone
    return pd.DataFrame(
        {
            "user_id": ["u", "u", "v", "u", "u"],
            "item_id": ["a", "b", "b", "c", "d"],
            "timestamp": [1.0, 1.0, 5.0, 1.0, 2.0],
        }
    )


def _items(frame: pd.DataFrame, user: str) -> list[str]:
    return list(frame[frame.user_id == user].item_id)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("reverse", ["c", "b", "a", "d"]),
        ("popular-last", ["a", "c", "b", "d"]),  # b has 2 interactions, a and c one
        ("popular-first", ["b", "a", "c", "d"]),
    ],
)
def test_only_the_order_inside_ties_changes(mode, expected):
    frame = _frame()
    out = reorder_ties(frame, mode, "user_id", "item_id", "timestamp")
    assert _items(out, "u") == expected
    assert sorted(map(tuple, out.values)) == sorted(map(tuple, frame.values))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode"):
        reorder_ties(_frame(), "shuffle", "user_id", "item_id", "timestamp")
