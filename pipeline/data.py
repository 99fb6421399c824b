"""Finding, checking and loading a dataset in RecBole's atomic format."""

from __future__ import annotations

from pathlib import Path

import recbole
from recbole.data import create_dataset, data_preparation

BUNDLED = {"ml-100k": Path(recbole.__file__).parent / "dataset_example" / "ml-100k"}


class DatasetError(ValueError):
    """A dataset that is missing or unusable; the message says how to fix it."""


def resolve_data_path(config) -> Path:
    """Point `config['data_path']` at the folder holding `<dataset>.inter`.

    ml-100k falls back to the copy inside the recbole wheel. RecBole itself would try to
    download a missing dataset (and prompt on stdin); we stop with the command to run.
    """
    name = config["dataset"]
    folder = Path(config["data_path"])
    inter = folder / f"{name}.inter"
    if not inter.is_file() and name in BUNDLED:
        folder = BUNDLED[name]
        inter = folder / f"{name}.inter"
    if not inter.is_file():
        raise DatasetError(
            f"dataset '{name}' not found: expected {inter}.\n"
            f"Prepare it from the raw download with:\n"
            f"  python -m datatools prepare {name} <raw file>\n"
            f"(dataset/README.md lists the sources), or set --data_path=<folder holding {name}/>"
        )
    config["data_path"] = str(folder)
    return inter


def load_data(config):
    """Return (dataset, train_data, valid_data, test_data) with RecBole's own loaders."""
    resolve_data_path(config)
    dataset = create_dataset(config)
    if dataset.inter_num == 0:
        raise DatasetError(
            f"dataset '{config['dataset']}' is empty after filtering "
            f"(user_inter_num_interval={config['user_inter_num_interval']}, "
            f"item_inter_num_interval={config['item_inter_num_interval']}); "
            "loosen the filters or use more data"
        )
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data
