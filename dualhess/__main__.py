"""``python -m dualhess``: the same as the ``dualhess`` command (see :mod:`dualhess.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":  # not on import (the docs build imports every module)
    sys.exit(main())
