"""Raw public datasets -> RecBole atomic files, and checks on atomic files.

`python -m datatools prepare <dataset> <raw path>` writes `dataset/<dataset>/<dataset>.inter`
(see dataset/README.md); `python -m datatools check <file.inter>` validates one.
The package does not import RecBole or torch, so preparing data stays quick.
"""

from datatools.atomic import AtomicSummary, check_atomic_file
from datatools.errors import DatasetError
from datatools.prepare import PrepareReport, prepare

__all__ = ["AtomicSummary", "DatasetError", "PrepareReport", "check_atomic_file", "prepare"]
