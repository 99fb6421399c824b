"""Train TiM4Rec: `python run.py [--config config/<file>.yaml] [--key=value ...]`.

With no --config it trains on the bundled ml-100k (config/config4ml-100k.yaml).
"""

import sys

from pipeline.config import DEFAULT_RUN_CONFIG
from pipeline.runner import main

if __name__ == "__main__":
    sys.exit(main("TiM4Rec", default_config=DEFAULT_RUN_CONFIG))
