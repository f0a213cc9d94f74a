"""MGRIT: multigrid reduction in time for the layer ("time") dimension, distributed over ranks.

A stack of N residual layers is N forward-Euler steps of an ODE, u_{k+1} = Phi_k(u_k) with
Phi_k(u) = u + dt * F_k(u). Serially that is N dependent steps. MGRIT (Falgout et al. 2014; nonlinear FAS
form, Falgout et al. 2017; for networks, Guenther et al. 2020) solves all N+1 states at once, iteratively:

  relax        F-relaxation: from every C-point (every cf-th point) step through the following F-points;
               FCF: F, then update each C-point from the F-point before it, then F again. Embarrassingly
               parallel across ranks: each rank only needs the state at its left boundary.
  restrict     inject C-points to the coarse grid; the FAS right-hand side makes the coarse solution equal
               the fine one wherever the fine problem is solved: g_c = g + Phi_fine(u_{c-1}) - Phi_coarse(u_{c-cf}).
  coarse solve recursively (V-cycle) down to the coarsest level, which is solved exactly by stepping; that
               solve is sequential across ranks (a pipeline) and is the serial part of the algorithm.
  correct      C-points take the coarse values; the next relaxation carries them to the F-points.

Layout (this module is index-generic: the forward solve runs over layer indices, the adjoint over reversed
indices). Points 0..N; rank r owns the steps a_r..b_r-1 and computes the points a_r+1..b_r; point a_r (its
left boundary) belongs to rank r-1, or is the initial condition on rank 0. Rank boundaries are C-points on
every level, so no coarse interval crosses a rank, every coarse step uses a layer the rank holds, and each
relaxation needs exactly one boundary message from the left neighbour.

Coarse propagator (a choice; see docs/mgrit.md): the coarse step over fine points [i, j) re-discretises
with the first layer of the interval and a step (j - i) * dt:  u + (j - i) * dt * F_i(u)  (torchbraid's
choice for ResNets). It costs one layer evaluation, like a fine step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .link import Link

log = logging.getLogger("tpblocks.parallel.mgrit")

Step = Callable[[int, int, torch.Tensor], torch.Tensor]  # (from point, to point, state) -> state


def partition(n_steps: int, world: int) -> list[tuple[int, int]]:
    """Contiguous split of steps 0..n_steps-1 over ``world`` ranks: [(a_r, b_r)], sizes differing by at most 1."""
    if n_steps < world:
        raise ValueError(
            f"the layer stack has {n_steps} layers but the layer-parallel group has {world} ranks; every rank "
            f"needs at least one layer: use a deeper model or fewer ranks"
        )
    base, extra = divmod(n_steps, world)
    bounds, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


@dataclass(frozen=True)
class Hierarchy:
    """This rank's points on every level (level 0 = all points s0..s1), both boundaries included."""

    points: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, s0: int, s1: int, cf: int, levels: int) -> Hierarchy:
        assert s1 > s0 and cf >= 2 and levels >= 1
        pts = [tuple(range(s0, s1 + 1))]
        for _ in range(levels - 1):
            coarse = list(pts[-1][::cf])
            if coarse[-1] != s1:  # the rank boundary is a C-point on every level
                coarse.append(s1)
            pts.append(tuple(coarse))
        return cls(tuple(pts))

    def mirrored(self, n: int) -> Hierarchy:
        """The same grid seen backwards (point p -> n - p): the adjoint solve runs on it."""
        return Hierarchy(tuple(tuple(sorted(n - p for p in level)) for level in self.points))

    @property
    def s0(self) -> int:
        return self.points[0][0]

    @property
    def s1(self) -> int:
        return self.points[0][-1]

    @property
    def levels(self) -> int:
        return len(self.points)


@dataclass
class SolveStats:
    """What one MGRIT solve did: relative residual after each iteration's relaxation, and the final sweep's
    relative jump at the C-points (how much the last iterate still moved: an a-posteriori error estimate)."""

    residuals: list[float]
    jump: float = 0.0

    @property
    def iters(self) -> int:
        return len(self.residuals)


class MGRITSolver:
    """One rank's part of an MGRIT solve. Every rank of the group must call the same methods in the same order
    (the messages pair up by order); the group-wide residual is an all-reduce, so all ranks stop together."""

    def __init__(self, hierarchy: Hierarchy, step: Step, link: Link, relax: str = "FCF", name: str = "forward"):
        self.h = hierarchy
        self.step = step
        self.link = link
        self.fcf = relax == "FCF"
        self.name = name
        self.L = hierarchy.levels
        self._pred = [{b: a for a, b in zip(p, p[1:])} for p in hierarchy.points]
        self._cset = [frozenset(hierarchy.points[lvl + 1]) for lvl in range(self.L - 1)]
        self.u: list[dict[int, torch.Tensor]] = []
        self.g: list[dict[int, torch.Tensor]] = []

    # ------------------------------------------------------------------ pieces
    def _rhs(self, lvl: int, b: int, value: torch.Tensor) -> torch.Tensor:
        g = self.g[lvl].get(b)
        return value if g is None else value + g

    def _f_relax(self, lvl: int) -> None:
        # Points are sorted, so one pass in order computes each F-point from the point just before it.
        pts, cset, u = self.h.points[lvl], self._cset[lvl], self.u[lvl]
        for a, b in zip(pts, pts[1:]):
            if b not in cset:
                u[b] = self._rhs(lvl, b, self.step(a, b, u[a]))

    def _c_relax(self, lvl: int) -> None:
        u, pred = self.u[lvl], self._pred[lvl]
        for c in self.h.points[lvl + 1][1:]:
            u[c] = self._rhs(lvl, c, self.step(pred[c], c, u[pred[c]]))

    def _exchange(self, lvl: int) -> None:
        u = self.u[lvl]
        got = self.link.exchange(u[self.h.s1], u[self.h.s0])
        if got is not None:
            u[self.h.s0] = got

    def _restrict(self, lvl: int, want_residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """FAS restriction to level lvl+1; returns (sum r^2, sum u_C^2) over this rank's C-points."""
        fine, pred = self.u[lvl], self._pred[lvl]
        coarse_pts = self.h.points[lvl + 1]
        uc = {p: fine[p] for p in coarse_pts}
        gc: dict[int, torch.Tensor] = {}
        r2 = torch.zeros((), dtype=torch.float64)
        n2 = torch.zeros((), dtype=torch.float64)
        for cp, c in zip(coarse_pts, coarse_pts[1:]):
            q = pred[c]
            fine_val = self._rhs(lvl, c, self.step(q, c, fine[q]))
            if q == cp:  # a one-step coarse interval: the coarse step is the fine step, g carries over
                if c in self.g[lvl]:
                    gc[c] = self.g[lvl][c]
            else:
                gc[c] = fine_val - self.step(cp, c, fine[cp])
            if want_residual:
                r2 += (fine_val - fine[c]).double().square().sum().cpu()
                n2 += fine[c].double().square().sum().cpu()
        self.u[lvl + 1], self.g[lvl + 1] = uc, gc
        return r2, n2

    def _correct(self, lvl: int) -> None:
        for c in self.h.points[lvl + 1][1:]:
            self.u[lvl][c] = self.u[lvl + 1][c]

    def _coarsest_solve(self, lvl: int) -> None:
        # Exact by stepping; sequential across ranks: wait for the left neighbour, step, pass on.
        pts, u = self.h.points[lvl], self.u[lvl]
        got = self.link.recv_prev(u[self.h.s0])
        if got is not None:
            u[self.h.s0] = got
        for a, b in zip(pts, pts[1:]):
            u[b] = self._rhs(lvl, b, self.step(a, b, u[a]))
        self.link.send_next(u[self.h.s1])

    def _relax(self, lvl: int) -> None:
        self._f_relax(lvl)
        if self.fcf:
            self._c_relax(lvl)
            self._exchange(lvl)
            self._f_relax(lvl)

    def _cycle(self, lvl: int) -> None:
        """V-cycle on a coarse level (lvl >= 1); ends with an F-relaxation that interpolates to all its points."""
        if lvl == self.L - 1:
            self._coarsest_solve(lvl)
            return
        self._relax(lvl)
        self._restrict(lvl, want_residual=False)
        self._cycle(lvl + 1)
        self._correct(lvl)
        self._exchange(lvl)
        self._f_relax(lvl)

    def _relative(self, r2: torch.Tensor, n2: torch.Tensor) -> float:
        total = self.link.allreduce_sum(torch.stack([r2, n2]))
        return math.sqrt(float(total[0]) / max(float(total[1]), 1e-300))

    # ------------------------------------------------------------------ driver
    def solve(self, u0: dict[int, torch.Tensor], iters: int, tol: float = 0.0) -> SolveStats:
        """Iterate from the initial guess ``u0`` (every level-0 point; u0[s0] is the initial condition on the
        first rank). Afterwards ``self.u[0]`` holds the iterate; call ``final_sweep`` to finish."""
        self.u = [dict(u0)] + [{} for _ in range(self.L - 1)]
        self.g = [{} for _ in range(self.L)]
        if self.L == 1:
            self._coarsest_solve(0)
            self.link.flush()
            return SolveStats([0.0])
        residuals: list[float] = []
        for it in range(iters):
            self._relax(0)
            rel = self._relative(*self._restrict(0, want_residual=True))
            residuals.append(rel)
            log.debug("mgrit %s iteration %d: relative residual %.3e", self.name, it + 1, rel)
            if rel <= tol:
                break
            self._cycle(1)
            self._correct(0)
            self._exchange(0)
        self.link.flush()
        return SolveStats(residuals)

    def final_sweep(self, step: Step, replace_c: bool) -> float:
        """Last pass over this rank's steps (all ranks in parallel), from the freshest boundary state.

        ``step`` may do more than ``self.step`` (the adjoint also collects parameter gradients). With
        ``replace_c`` C-points take the swept values too (a rank-local serial pass); otherwise they keep their
        MGRIT values (an F-relaxation). Returns the relative jump ||new - old|| / ||new|| where the old value
        stays in use: at every C-point without ``replace_c``; with it only at the right boundary that the next
        rank already received (everything inside a rank is then exact given its boundary).
        """
        pts, u = self.h.points[0], self.u[0]
        if replace_c:
            cset = frozenset([self.h.s1]) if self.link.next is not None else frozenset()
        else:
            cset = self._cset[0] if self.L > 1 else frozenset(pts)
        j2 = torch.zeros((), dtype=torch.float64)
        n2 = torch.zeros((), dtype=torch.float64)
        for a, b in zip(pts, pts[1:]):
            new = step(a, b, u[a])
            if b in cset:
                j2 += (new - u[b]).double().square().sum().cpu()
                n2 += new.double().square().sum().cpu()
            if replace_c or b not in cset:
                u[b] = new
        return self._relative(j2, n2)
