"""RecBole 1.2.x on today's stack: every fix in one place, applied once by `apply()`.

Each fix names what broke and has its own test in tests/test_compat.py.

- numpy 2 removed `np.float_`, `np.complex_`, `np.unicode_`; RecBole's
  `Config.compatibility_settings` reads them, so `Config()` itself fails. We replace it
  with a version that sets only the old aliases RecBole's code still uses, to numpy 2 types.
- pandas: RecBole fills NaNs with chained `df[col].fillna(inplace=True)`, which does
  nothing under copy-on-write (pandas 3) and warns on pandas 2.2+. `_fill_nan` is
  replaced by an assignment-based version. pandas 3 also changed `Series.agg(len)`
  (RecBole's *_seq field handling), so requirements pin pandas < 3.
- torch >= 2.6 loads with `weights_only=True`; RecBole pickles its whole `Config` into
  checkpoints. Our trainer (pipeline/trainer.py) writes and reads plain-data checkpoints
  instead, so nothing here.
- Python 3.12: recbole 1.2.1 pins ray<=2.6.3 (no 3.12 wheel), so we use recbole 1.2.0,
  where ray is an extra, and never import `recbole.quick_start` (it imports ray).
- Importing `recbole.model.sequential_recommender` runs
  `torch.autograd.set_detect_anomaly(True)` (sine.py), which slows every backward pass
  (1.7x on CPU). `import_recbole_sequential_models()` imports them and switches it off.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import torch

_applied = False


def _numpy_aliases(self) -> None:  # replaces Config.compatibility_settings
    # RecBole still writes np.float, np.long, np.int, np.bool, np.object, np.str.
    np.bool = np.bool_
    np.int = np.int_
    np.float = np.float64
    np.complex = np.complex128
    np.object = np.object_
    np.str = np.str_
    np.long = np.int_
    np.unicode = np.str_


def _fill_nan(self) -> None:  # replaces Dataset._fill_nan, same semantics, no chained inplace
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x, dtype=dtype: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


def apply() -> None:
    """Patch RecBole for numpy 2 and pandas; idempotent."""
    global _applied
    if _applied:
        return
    from recbole.config import Config
    from recbole.data.dataset import Dataset

    Config.compatibility_settings = _numpy_aliases
    Dataset._fill_nan = _fill_nan
    _applied = True


def import_recbole_sequential_models() -> ModuleType:
    """Import `recbole.model.sequential_recommender` without its global anomaly mode."""
    anomaly_before = torch.is_anomaly_enabled()
    module = importlib.import_module("recbole.model.sequential_recommender")
    torch.autograd.set_detect_anomaly(anomaly_before)
    return module
