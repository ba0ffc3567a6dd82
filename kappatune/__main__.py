"""``python -m kappatune``: the same command line as the ``kappatune`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
