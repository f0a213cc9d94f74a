"""Experiment sweeps of the report's §6: grids -> manifest -> Slurm array / submitit -> results table + plots.

  grids.py     the six grids as override sets, at a matched parameter budget, with scale knobs
  manifest.py  a sweep on disk (manifest.json) and how a finished task is recorded
  task.py      one array task (``python -m tpblocks.sweeps.task``)
  submit.py    sbatch array / submitit / local backends
  collect.py   run directories -> rows -> CSV; Eq. 12 extremum distance
  plots.py     Fig. 17-22 style PNGs
  cli.py       ``launch/slurm/submit.py`` and ``launch/report.py``
"""

from .collect import collect, extremum_distance, extremum_distance_curve, write_csv
from .grids import GRIDS, SCALES, Scale, SweepPoint, expand, get_scale
from .manifest import Manifest, build_manifest, finalize_task, read_manifest

__all__ = [
    "GRIDS",
    "SCALES",
    "Manifest",
    "Scale",
    "SweepPoint",
    "build_manifest",
    "collect",
    "expand",
    "extremum_distance",
    "extremum_distance_curve",
    "finalize_task",
    "get_scale",
    "read_manifest",
    "write_csv",
]
