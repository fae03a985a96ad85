"""``python -m sparseprefill``: the same command line as the ``sparseprefill`` script."""

import sys

from .cli import main

sys.exit(main())
