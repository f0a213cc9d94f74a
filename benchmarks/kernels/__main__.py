"""``python -m benchmarks.kernels [--quick] [--json PATH]``: run every kernel benchmark."""

from .run_all import main

main()
