"""``python -m dualhess``: the same as the ``dualhess`` command (see :mod:`dualhess.cli`)."""

import sys

from .cli import main

sys.exit(main())
