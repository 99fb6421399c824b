"""Finding, checking and loading a dataset in RecBole's atomic format."""

from __future__ import annotations

from pathlib import Path

import recbole
from recbole.data import create_dataset, data_preparation

from datatools.atomic import check_atomic_file
from datatools.errors import DatasetError
from datatools.prepare import prepare_command

BUNDLED = {"ml-100k": Path(recbole.__file__).parent / "dataset_example" / "ml-100k"}

__all__ = ["BUNDLED", "DatasetError", "load_data", "resolve_data_path", "validate_atomic_file"]


def resolve_data_path(config) -> Path:
    """Point `config['data_path']` at the folder holding `<dataset>.inter`.

    ml-100k falls back to the copy inside the recbole wheel. RecBole itself would try to
    download a missing dataset (and prompt on stdin); we stop with the command to run.
    """
    name = config["dataset"]
    folder = Path(config["data_path"])  # RecBole already appended the dataset name
    inter = folder / f"{name}.inter"
    if not inter.is_file() and name in BUNDLED:
        folder = BUNDLED[name]
        inter = folder / f"{name}.inter"
    if not inter.is_file():
        raise DatasetError(
            f"dataset '{name}' not found: expected {inter}.\n"
            f"Prepare it from the raw download with:\n"
            f"  {prepare_command(name, folder.parent)}\n"
            f"(dataset/README.md says where each raw file is published), or set "
            f"--data_path=<folder holding {name}/>"
        )
    config["data_path"] = str(folder)
    return inter


def validate_atomic_file(path: Path, config) -> None:
    """Check `path` against the configuration before RecBole reads it.

    RecBole would fail on these with a pandas traceback, or worse go on: a NaN timestamp
    is silently replaced by the column mean. Raises DatasetError naming line and fix.
    """
    load_col = config["load_col"]
    columns = load_col.get("inter") if isinstance(load_col, dict) else None
    time_field = config["TIME_FIELD"]
    order = (config["eval_args"] or {}).get("order")
    needs_time = bool(time_field) and (order == "TO" or (columns and time_field in columns))
    required = [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]]
    required += [c for c in columns or [] if c not in required and c != time_field]
    check_atomic_file(
        Path(path),
        required=tuple(required),
        time_field=time_field if needs_time else None,
        separator=config["field_separator"] or "\t",
        count=False,
    )


def load_data(config):
    """Return (dataset, train_data, valid_data, test_data) with RecBole's own loaders."""
    inter = resolve_data_path(config)
    validate_atomic_file(inter, config)
    try:
        dataset = create_dataset(config)
    except ValueError as err:
        if "feat is empty" not in str(err):  # RecBole's words for "nothing left after filters"
            raise
        dataset = None
    if dataset is None or dataset.inter_num == 0:
        raise DatasetError(
            f"dataset '{config['dataset']}' is left empty by the filters: no user and item keep "
            f"enough interactions (user_inter_num_interval={config['user_inter_num_interval']}, "
            f"item_inter_num_interval={config['item_inter_num_interval']}: the 5-core filter of "
            "config/defaults.yaml). Use more data, or loosen those intervals "
            '(e.g. --user_inter_num_interval="[2,inf)" --item_inter_num_interval="[1,inf)")'
        )
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data
