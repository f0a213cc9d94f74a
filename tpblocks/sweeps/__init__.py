"""Experiment sweeps of the report's §6: grids -> manifest -> Slurm array / submitit -> results table + plots.

  grids.py     the six grids as override sets, at a matched parameter budget, with scale knobs
  manifest.py  a sweep on disk (manifest.json) and how a finished task is recorded
  task.py      one array task (``python -m tpblocks.sweeps.task``)
  submit.py    sbatch array / submitit / local backends
  collect.py   run directories -> rows -> CSV; Eq. 12 extremum distance
  plots.py     Fig. 17-22 style PNGs
  cli.py       ``launch/slurm/submit.py`` and ``launch/report.py``
"""

# (``collect`` is the submodule; its function is ``tpblocks.sweeps.collect.collect``.)
# Lazy exports: `python -m tpblocks.sweeps.task` runs 2-3 times per Slurm array element and must not pay for
# importing torch and matplotlib each time.
_EXPORTS = {
    "extremum_distance": "collect",
    "extremum_distance_curve": "collect",
    "write_csv": "collect",
    "GRIDS": "grids",
    "SCALES": "grids",
    "Scale": "grids",
    "SweepPoint": "grids",
    "expand": "grids",
    "get_scale": "grids",
    "Manifest": "manifest",
    "build_manifest": "manifest",
    "finalize_task": "manifest",
    "read_manifest": "manifest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
