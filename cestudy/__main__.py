"""``python -m cestudy``: the command line of ``cestudy.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
