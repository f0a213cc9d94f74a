"""``python -m benchmarks.gpu [--dry-run] --out DIR``: the whole GPU check (see ``benchmarks/gpu/__init__.py``)."""

import sys

from .run import main

sys.exit(main())
