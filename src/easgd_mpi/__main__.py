"""``python -m easgd_mpi`` is the ``easgd`` command."""

import sys

from .cli import main

sys.exit(main())
