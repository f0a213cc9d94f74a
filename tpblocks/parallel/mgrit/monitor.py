"""Error monitor and adaptive policy for layer-parallel training.

Inexact MGRIT solves bias the gradient. Far from a minimum the bias is small next to the gradient and
training proceeds as if serial; near a minimum the gradient shrinks, the bias does not, and convergence
stalls. The monitor watches, per optimizer step:

  residuals       relative MGRIT residual of every forward and adjoint iteration (logged)
  grad_err_est    an a-posteriori estimate of the gradient's relative error: the relative jump the final
                  sweep measured at the C-points, forward + adjoint (how far the last iterate still was from
                  satisfying every step). Cheap: it comes out of work the solve does anyway.
  grad_err        optionally, every ``check_every`` steps, the true relative error against a serial pass
  loss            to detect a plateau (mean over a window improved by less than ``plateau_rel``)

Policy (``MGRITConfig.policy``), applied when the error matters, i.e. error > grad_tol, or on a loss plateau
with error > plateau_grad_tol:
  add_iters   one more forward and adjoint iteration (up to max_iters), then serial
  serial      switch to serial training at once
Every decision is logged (logger ``tpblocks.parallel.mgrit``) and kept in ``events``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from .config import MGRITConfig

log = logging.getLogger("tpblocks.parallel.mgrit")

NONE, ADD_ITERS, SERIAL = 0, 1, 2
ACTIONS = {NONE: "none", ADD_ITERS: "add_iters", SERIAL: "serial"}


@dataclass
class MonitorState:
    """What the policy controls. Shared by every MGRIT stack of a model."""

    fwd_iters: int
    bwd_iters: int
    serial: bool = False


@dataclass
class MGRITMonitor:
    cfg: MGRITConfig
    state: MonitorState = field(init=False)
    events: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = MonitorState(self.cfg.iters, self.cfg.adjoint_iters)
        self._losses: deque[float] = deque(maxlen=2 * max(self.cfg.plateau_window, 1))

    # ------------------------------------------------------------------ decisions
    def decide(self, step: int, loss: float | None, grad_err_est: float | None, grad_err: float | None = None) -> int:
        """The action this step's measurements call for (``NONE``, ``ADD_ITERS`` or ``SERIAL``); pure, no effects."""
        if self.state.serial or not self.cfg.monitor:
            return NONE
        err = grad_err if grad_err is not None else grad_err_est
        if err is None:
            return NONE
        if err > self.cfg.grad_tol:
            return self._escalation()
        if loss is not None and self._plateau(loss) and err > self.cfg.plateau_grad_tol:
            return self._escalation()
        return NONE

    def _escalation(self) -> int:
        s = self.state
        if self.cfg.policy == "add_iters" and max(s.fwd_iters, s.bwd_iters) < self.cfg.max_iters:
            return ADD_ITERS
        return SERIAL

    def _plateau(self, loss: float) -> bool:
        w = self.cfg.plateau_window
        if w == 0:
            return False
        self._losses.append(float(loss))
        if len(self._losses) < 2 * w:
            return False
        values = list(self._losses)
        before, after = sum(values[:w]) / w, sum(values[w:]) / w
        return (before - after) < self.cfg.plateau_rel * abs(before)

    def apply(self, step: int, action: int, why: dict) -> None:
        """Carry out ``action`` (the same on every rank: the caller agrees on it first) and log it."""
        if action == NONE:
            return
        s = self.state
        if action == ADD_ITERS:
            s.fwd_iters = min(s.fwd_iters + 1, self.cfg.max_iters)
            s.bwd_iters = min(s.bwd_iters + 1, self.cfg.max_iters)
            what = f"MGRIT iterations raised to forward {s.fwd_iters} / adjoint {s.bwd_iters}"
        else:
            s.serial = True
            what = "switched to serial training"
        self._losses.clear()  # judge the next plateau on losses measured after the change
        event = {"step": step, "action": ACTIONS[action], **why}
        self.events.append(event)
        log.warning("layer-parallel monitor, step %d: %s (%s)", step, what, _fmt(why))

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        log.debug("layer-parallel monitor: %s", _fmt(entry))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """What a resumed run needs to carry on where this one stopped: the iterations the policy raised (or the
        switch to serial), its decisions so far, and the loss window the plateau test is judging."""
        s = self.state
        return {"fwd_iters": s.fwd_iters, "bwd_iters": s.bwd_iters, "serial": s.serial,
                "events": list(self.events), "losses": list(self._losses)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.state = MonitorState(int(state["fwd_iters"]), int(state["bwd_iters"]), bool(state["serial"]))
        self.events = list(state["events"])
        self._losses.clear()
        self._losses.extend(float(x) for x in state["losses"])


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
