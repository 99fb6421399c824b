"""Evaluate a checkpoint on the test split: `python test.py --checkpoint saved/<file>.pth`."""

import sys

from pipeline.runner import test_main

if __name__ == "__main__":
    sys.exit(test_main())
