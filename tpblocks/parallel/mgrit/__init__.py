"""Layer-parallel training by multigrid reduction in time (MGRIT), forward and adjoint, with an error monitor.

    from tpblocks.parallel.mgrit import MGRITConfig, MGRITStack, apply_layer_parallel

    lp = apply_layer_parallel(model, {"enabled": True, "levels": 2, "cf": 4, "iters": 2}, group)
    ...
    metrics = lp.step_end(step, loss.item())

See docs/mgrit.md for the algorithm, the coarse-grid choice, the monitor and the measured figures.
"""

from .config import MGRITConfig
from .cost import analytic_speedup
from .integrate import LayerParallel, apply_layer_parallel
from .link import DistLink, Link
from .monitor import MGRITMonitor, MonitorState
from .solver import Hierarchy, MGRITSolver, SolveStats, partition
from .stack import MGRITStack

__all__ = [
    "DistLink",
    "Hierarchy",
    "LayerParallel",
    "Link",
    "MGRITConfig",
    "MGRITMonitor",
    "MGRITSolver",
    "MGRITStack",
    "MonitorState",
    "SolveStats",
    "analytic_speedup",
    "apply_layer_parallel",
    "partition",
]
