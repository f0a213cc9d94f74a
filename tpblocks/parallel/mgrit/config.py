"""Typed configuration of layer-parallel training by MGRIT (the ``layer_parallel:`` block of a training config).

    layer_parallel:
      enabled: true        # off = the model runs its layers serially, as without this block
      levels: 2            # time-grid levels (1 = a pipelined serial solve, exact, no parallelism)
      cf: 4                # coarsening factor between levels
      iters: 2             # MGRIT iterations of the forward solve (V-cycles)
      bwd_iters: null      # iterations of the adjoint (backward) solve; null = iters
      tol: 0.0             # stop early when the relative residual is below this (0 = always run `iters`)
      relax: FCF           # F or FCF relaxation
      policy: add_iters    # what the error monitor does when the gradient bias matters: add_iters | serial

Every field is checked in ``__post_init__``; a bad value fails at start-up with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tpblocks.typed import check_fields, from_mapping
from tpblocks.typed import require as _require

RELAXATIONS = ("F", "FCF")
FINAL_SWEEPS = ("serial", "F")
POLICIES = ("add_iters", "serial")
UNITS = ("stages", "lanes")


@dataclass(frozen=True, kw_only=True)
class MGRITConfig:
    """Solver and monitor settings. Defaults are a sensible start for a 2-level, 2-iteration layer-parallel run."""

    enabled: bool = False
    levels: int = 2
    cf: int = 4
    iters: int = 2
    bwd_iters: int | None = None
    tol: float = 0.0
    relax: str = "FCF"
    # Forward-Euler step. dt = 1 reproduces the residual network exactly: h + 1 * (layer(h) - h) = layer(h).
    dt: float = 1.0
    # After the last iteration every rank sweeps its own layers serially from its (MGRIT) boundary state
    # ("serial": the error then sits only at the P-1 rank boundaries; costs one relaxation) or only updates the
    # F-points ("F": textbook MGRIT, C-points keep their multigrid values).
    final_sweep: str = "serial"
    # "stages": one time step per model stage (Llama DecoderLayer, or a whole TP block). "lanes": one time step
    # per lane layer inside every TP block (state x_lbsd); needs arch="tp_blocks" without delayed communication.
    unit: str = "stages"
    # Keep the autograd graph of each step between adjoint iterations (memory of one serial backward; each
    # repeated vector-Jacobian product then costs a backward only, not forward + backward).
    cache_graphs: bool = True
    # Without autograd (evaluation, generation) run the exact serial stack on every rank: metrics stay unbiased.
    eval_serial: bool = True

    # --- error monitor and adaptive policy (monitor.py) ---
    monitor: bool = True
    policy: str = "add_iters"  # add_iters: raise iters (up to max_iters), then serial; serial: switch at once
    grad_tol: float = 0.05  # escalate when the estimated relative gradient error exceeds this
    max_iters: int = 8
    plateau_window: int = 20  # steps per window of the loss-plateau test (0 = off)
    plateau_rel: float = 0.01  # a window improving the mean loss by less than this fraction is a plateau
    plateau_grad_tol: float = 0.01  # on a plateau, escalate when the gradient error exceeds this (smaller) bound
    check_every: int = 0  # every N steps measure the true gradient error against a serial pass (0 = never)

    def __post_init__(self) -> None:
        check_fields(self, "layer_parallel")
        _require(self.levels >= 1, f"levels={self.levels} must be >= 1 (2 or more for parallelism)")
        _require(self.cf >= 2, f"cf={self.cf} must be >= 2: the coarse grid keeps every cf-th layer boundary")
        _require(self.iters >= 1, f"iters={self.iters} must be >= 1")
        _require(self.bwd_iters is None or self.bwd_iters >= 1, f"bwd_iters={self.bwd_iters} must be >= 1 or null")
        _require(self.tol >= 0, f"tol={self.tol} must be >= 0 (0 runs exactly `iters` iterations)")
        _require(self.relax in RELAXATIONS, f"relax={self.relax!r} is unknown; choose one of {RELAXATIONS}")
        _require(self.dt > 0, f"dt={self.dt} must be > 0 (1.0 reproduces the model exactly)")
        _require(
            self.final_sweep in FINAL_SWEEPS, f"final_sweep={self.final_sweep!r} is unknown; choose {FINAL_SWEEPS}"
        )
        _require(self.unit in UNITS, f"unit={self.unit!r} is unknown; choose one of {UNITS}")
        _require(self.policy in POLICIES, f"policy={self.policy!r} is unknown; choose one of {POLICIES}")
        _require(self.grad_tol > 0, f"grad_tol={self.grad_tol} must be > 0")
        _require(self.plateau_grad_tol > 0, f"plateau_grad_tol={self.plateau_grad_tol} must be > 0")
        _require(
            self.max_iters >= max(self.iters, self.bwd_iters or 1),
            f"max_iters={self.max_iters} must be >= iters={self.iters} and bwd_iters={self.bwd_iters}",
        )
        _require(self.plateau_window >= 0, f"plateau_window={self.plateau_window} must be >= 0 (0 = off)")
        _require(0 <= self.plateau_rel < 1, f"plateau_rel={self.plateau_rel} must be in [0, 1)")
        _require(self.check_every >= 0, f"check_every={self.check_every} must be >= 0 (0 = never)")

    @property
    def adjoint_iters(self) -> int:
        return self.bwd_iters if self.bwd_iters is not None else self.iters

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MGRITConfig:
        """Build from a plain mapping (e.g. an OmegaConf ``layer_parallel`` block); unknown keys are an error."""
        return from_mapping(cls, values, "layer_parallel")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> MGRITConfig:
        return dataclasses.replace(self, **changes)
