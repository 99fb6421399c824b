"""Train SASRec with the shared pipeline: `python run.py [--dataset=NAME] [--key=value ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from pipeline.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("SASRec", default_config=Path(__file__).resolve().parent / "config.yaml"))
