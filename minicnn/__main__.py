"""``python -m minicnn ...`` is the same as the ``minicnn`` console script."""

import sys

from minicnn.cli import main

sys.exit(main())
