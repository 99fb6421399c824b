"""Model names -> classes: the project's own models and RecBole's stock baselines."""

from __future__ import annotations

import importlib

from pipeline import compat

PROJECT_MODELS = {
    "TiM4Rec": "tim4rec",
    "SSD4Rec": "tim4rec",
    "Mamba4Rec": "models.mamba4rec",
    "TiSASRec": "models.tisasrec",
    "LRURec": "models.lrurec",
}
RECBOLE_MODELS = ("SASRec", "BERT4Rec", "GRU4Rec", "Caser")
SSD_MODELS = ("TiM4Rec", "SSD4Rec")  # the TiSSD models: one config file serves both


def model_names() -> list[str]:
    return list(PROJECT_MODELS) + list(RECBOLE_MODELS)


def get_model_class(name: str) -> type:
    if name in PROJECT_MODELS:
        return getattr(importlib.import_module(PROJECT_MODELS[name]), name)
    if name in RECBOLE_MODELS:
        return getattr(compat.import_recbole_sequential_models(), name)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
