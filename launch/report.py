#!/usr/bin/env python
"""Gather sweep / run directories into a CSV table and PNG plots like the report's Fig. 17-22; given run
directories only, draw each run's loss curve (<run_dir>/loss_curve.png, as the trainer does at the end).

    python launch/report.py outputs/sweeps/lane_count_tiny_20260101-120000 [more dirs] [--out DIR]
    python launch/report.py outputs/2026-12-01/07-25-06_quickstart
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without `pip install -e .`

from tpblocks.sweeps.cli import report_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(report_main())
