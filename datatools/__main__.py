"""`python -m datatools ...`: see datatools/cli.py."""

import sys

from datatools.cli import main

if __name__ == "__main__":
    sys.exit(main())
