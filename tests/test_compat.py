"""One test per RecBole-on-today's-stack fix in pipeline/compat.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
from recbole.data import create_dataset

from pipeline import compat
from pipeline.config import REPO_ROOT, build_config
from tim4rec import TiM4Rec


def run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_numpy2_config_builds_and_aliases_point_to_numpy2_types(ml100k_slice):
    config = build_config(TiM4Rec, [], {"dataset": "ml-slice", "data_path": str(ml100k_slice)})
    assert config["model"] == "TiM4Rec"
    assert np.float is np.float64 and np.long is np.int_  # what RecBole's metrics still use


def test_fill_nan_fills_without_chained_inplace(tmp_path):
    folder = tmp_path / "nan-set"
    folder.mkdir()
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(6):
        for i in range(6):
            rating = "" if (u, i) == (0, 0) else str(float(i + 1))
            rows.append(f"u{u}\ti{i}\t{rating}\t{1000 + 10 * i}")
    (folder / "nan-set.inter").write_text("\n".join(rows) + "\n")
    config = build_config(
        TiM4Rec,
        [],
        {
            "dataset": "nan-set",
            "data_path": str(tmp_path),
            "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        },
    )
    dataset = create_dataset(config)
    ratings = np.asarray(dataset.inter_feat["rating"], dtype=float)
    assert not np.isnan(ratings).any()
    known = [float(i + 1) for u in range(6) for i in range(6) if (u, i) != (0, 0)]
    assert np.isclose(ratings, np.mean(known)).sum() >= 1  # the missing one got the column mean


def test_token_seq_fields_are_remapped_per_row(tmp_path):
    """RecBole's *_seq handling (Series.agg(len)) silently breaks on pandas 3: we pin < 3."""
    assert int(pd.__version__.split(".")[0]) < 3
    folder = tmp_path / "seq-set"
    folder.mkdir()
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    inter += [f"u{u}\ti{i}\t{100 * u + i}" for u in range(5) for i in range(5)]
    (folder / "seq-set.inter").write_text("\n".join(inter) + "\n")
    genres = {f"i{i}": " ".join(f"g{j}" for j in range(i + 1)) for i in range(5)}
    item = ["item_id:token\tgenre:token_seq"] + [f"{k}\t{v}" for k, v in genres.items()]
    (folder / "seq-set.item").write_text("\n".join(item) + "\n")
    config = build_config(
        TiM4Rec,
        [],
        {
            "dataset": "seq-set",
            "data_path": str(tmp_path),
            "load_col": {
                "inter": ["user_id", "item_id", "timestamp"],
                "item": ["item_id", "genre"],
            },
        },
    )
    dataset = create_dataset(config)
    tokens = dataset.field2id_token["item_id"]
    genre_tokens = dataset.field2id_token["genre"]
    for index in range(1, len(tokens)):
        ids = dataset.item_feat["genre"][index]
        decoded = [genre_tokens[j] for j in ids.tolist() if j != 0]
        assert decoded == genres[tokens[index]].split()


def test_pipeline_never_imports_ray():
    code = "import sys, pipeline.runner, run, test; print('ray' in sys.modules)"
    assert run_python(code) == "False"


def test_recbole_models_import_leaves_anomaly_mode_off():
    code = (
        "import torch; from pipeline.registry import get_model_class; "
        "get_model_class('SASRec'); print(torch.is_anomaly_enabled())"
    )
    assert run_python(code) == "False"
    # and RecBole's own import does switch it on, which is what the fix undoes
    assert (
        run_python(
            "import torch, recbole.model.sequential_recommender; print(torch.is_anomaly_enabled())"
        )
        == "True"
    )


def test_apply_is_idempotent():
    compat.apply()
    compat.apply()
    from recbole.config import Config

    assert Config.compatibility_settings is compat._numpy_aliases
