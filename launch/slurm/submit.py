#!/usr/bin/env python
"""Submit a whole §6 sweep as one Slurm job array (or submitit jobs, or local runs).

    python launch/slurm/submit.py sweep_lane_count     # grid + knobs: conf/experiment/sweep_lane_count.yaml
    python launch/slurm/submit.py lane_count --scale tiny --set lane_count=1,2,4 --wait --report
    python launch/slurm/submit.py delayed_comm --scale paper --nodes 4 --gpus-per-node 8 --partition gpu

See ``python launch/slurm/submit.py --help`` and tpblocks/sweeps/cli.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a clone without `pip install -e .`

from tpblocks.sweeps.cli import submit_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(submit_main())
