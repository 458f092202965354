"""``python -m sq_kernels ...``: the same as the ``sq-kernels`` command."""
import sys

from .cli import main

sys.exit(main())
