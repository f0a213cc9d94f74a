"""Analytic cost of MGRIT against the serial pass: layer evaluations on the critical path, communication ignored.

Units: one layer forward = 1. A serial backward through a layer = ``c_bwd`` (about 2: two matmuls per forward
matmul). An MGRIT adjoint step is a vector-Jacobian product on a cached graph (``c_bwd``), plus one forward to
build the graph the first time a step is used (recomputation, like activation checkpointing).

Per iteration on level l (n_l points per rank, cf coarsening): F-relaxation (1 - 1/cf) n_l steps, FCF adds
n_l/cf + (1 - 1/cf) n_l, restriction 2 n_l/cf; the coarsest level is a sequential solve of N_L steps over all
ranks (its pipeline is the serial part). A final sweep costs n_0 steps (with parameter gradients backwards).
The speed-up is serial / MGRIT: a bound that ignores messages (gloo: about 0.1 ms per boundary hop here).
"""

from __future__ import annotations

import math


def _levels(n_layers: int, ranks: int, cf: int, levels: int) -> list[tuple[float, float]]:
    """(points per rank, points in total) on each level, with rank boundaries kept as C-points."""
    per_rank = n_layers / ranks
    out = []
    for _ in range(levels):
        out.append((per_rank, per_rank * ranks))
        per_rank = max(1.0, math.ceil(per_rank / cf))
    return out


def mgrit_pass_cost(n_layers: int, ranks: int, cf: int, levels: int, iters: int, relax: str, step_cost: float) -> float:
    """Critical-path cost of one MGRIT solve (forward or adjoint) plus its final sweep, in ``step_cost`` units."""
    lv = _levels(n_layers, ranks, cf, levels)
    if levels == 1:
        return n_layers * step_cost  # a pipelined serial solve
    per_iter = 0.0
    for l_idx, (n_l, _) in enumerate(lv[:-1]):
        relax_cost = (1 - 1 / cf) * n_l
        if relax == "FCF":
            relax_cost += n_l / cf + (1 - 1 / cf) * n_l
        restrict = 2 * n_l / cf
        interp = (1 - 1 / cf) * n_l if l_idx > 0 else 0.0
        per_iter += relax_cost + restrict + interp
    per_iter += lv[-1][1]  # coarsest level: sequential across all ranks
    return (iters * per_iter + lv[0][0]) * step_cost


def analytic_speedup(
    n_layers: int,
    ranks: int,
    cf: int = 4,
    levels: int = 2,
    iters: int = 2,
    bwd_iters: int | None = None,
    relax: str = "FCF",
    c_bwd: float = 2.0,
) -> dict[str, float]:
    """Serial and MGRIT forward+backward cost (layer-forward units) and their ratio for ``ranks`` processors."""
    bwd_iters = iters if bwd_iters is None else bwd_iters
    serial = n_layers * (1.0 + c_bwd)
    fwd = mgrit_pass_cost(n_layers, ranks, cf, levels, iters, relax, 1.0)
    # Adjoint: every step a VJP on a cached graph, plus one forward per distinct step to build its graph.
    bwd = mgrit_pass_cost(n_layers, ranks, cf, levels, bwd_iters, relax, c_bwd)
    bwd += n_layers / ranks + sum(n / cf for n, _ in _levels(n_layers, ranks, cf, levels)[:-1])
    return {"serial": serial, "mgrit": fwd + bwd, "speedup": serial / (fwd + bwd)}
