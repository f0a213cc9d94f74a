"""Learning-rate schedules: linear warm-up, then cosine (1 cycle) or WSD (warm-up, stable, decay).

Both are ``torch.optim.lr_scheduler.LambdaLR`` with a picklable factor object, so ``state_dict()`` carries the
schedule's own numbers (warm-up steps, horizon) and a resumed run continues on the same curve.

Step convention: the factor for optimizer step ``t`` (1-based, the t-th update) is ``factor(t - 1)``; LambdaLR
starts at ``last_epoch = 0``, so the first update uses ``factor(0)``. Warm-up goes 1/W, 2/W, ..., 1 over
``W = round(warmup_fraction x max_steps)`` updates (the first update never uses a zero lr); the decay then runs
from the peak (first update after warm-up / first of the WSD decay) towards ``min_lr_ratio x lr``, which the
last update approaches within one step's decrement (as transformers' cosine schedule: no update is wasted at 0).

WSD extension (report §5.3.4: "restart a training from a checkpoint and pursue the training further"). The
stable phase is flat at the peak lr, so a stable-phase checkpoint can take a longer horizon: on resume with a
larger ``train.max_steps`` the warm-up length is kept from the checkpoint (it has already happened) and the
decay is recomputed from the new horizon: decay starts at ``round(max_steps_new x (1 - decay_fraction))``.
This is allowed only if the checkpoint's step lies before the new decay start *and* before the old decay
start (a run already decaying cannot be un-decayed); anything else raises a ValueError. A cosine schedule has
no flat phase, so a changed horizon is refused too.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from tpblocks.config import SchedulerConfig


class ScheduleFactor:
    """lr multiplier as a function of the 0-based update index. Picklable; its __dict__ is the LambdaLR state."""

    def __init__(self, name: str, max_steps: int, warmup_steps: int, min_ratio: float, decay_fraction: float):
        self.name = name
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio
        self.decay_fraction = decay_fraction

    @property
    def decay_start(self) -> int:
        """First update index of the WSD decay (equal to max_steps for cosine: it has no stable phase)."""
        if self.name != "wsd":
            return self.warmup_steps
        return max(self.warmup_steps, round(self.max_steps * (1 - self.decay_fraction)))

    def __call__(self, i: int) -> float:
        if i < self.warmup_steps:
            return (i + 1) / self.warmup_steps
        if self.name == "cosine":
            span = max(1, self.max_steps - self.warmup_steps)
            progress = min(1.0, (i - self.warmup_steps) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        start = self.decay_start
        if i < start:
            return 1.0
        span = max(1, self.max_steps - start)
        progress = min(1.0, (i - start) / span)
        return 1.0 - (1.0 - self.min_ratio) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int) -> LambdaLR:
    """LambdaLR over ``optimizer`` following ``cfg`` for a run of ``max_steps`` updates."""
    warmup = round(cfg.warmup_fraction * max_steps)
    factor = ScheduleFactor(cfg.name, max_steps, warmup, cfg.min_lr_ratio, cfg.decay_fraction)
    return LambdaLR(optimizer, factor)


def load_scheduler_state(scheduler: LambdaLR, state: dict, max_steps: int) -> int:
    """Restore ``state`` into ``scheduler`` for a run now set to ``max_steps`` updates (see module docstring).
    Returns the checkpoint's ``max_steps`` (the horizon it was trained for)."""
    factor: ScheduleFactor = scheduler.lr_lambdas[0]
    wanted = dict(vars(factor))
    scheduler.load_state_dict(state)  # overwrites the factor's __dict__ with the saved one
    saved: ScheduleFactor = scheduler.lr_lambdas[0]
    done = int(state["last_epoch"])  # updates already taken
    if saved.name != wanted["name"]:
        raise ValueError(
            f"scheduler.name={wanted['name']!r} but the checkpoint was trained with {saved.name!r}; resume with "
            f"scheduler={saved.name}"
        )
    # The schedule's shape is the checkpoint's: a changed shape would otherwise be silently overwritten by it.
    for key, name in (("min_ratio", "min_lr_ratio"), ("decay_fraction", "decay_fraction")):
        if getattr(saved, key) != wanted[key]:
            raise ValueError(
                f"scheduler.{name}={wanted[key]} differs from the checkpoint's {getattr(saved, key)}: the schedule "
                f"cannot change on resume; set scheduler.{name}={getattr(saved, key)} (or start a new run)"
            )
    if saved.max_steps == max_steps and saved.warmup_steps != wanted["warmup_steps"]:
        raise ValueError(
            f"scheduler.warmup_fraction gives {wanted['warmup_steps']} warm-up steps but the checkpoint was trained "
            f"with {saved.warmup_steps}: the schedule cannot change on resume; restore scheduler.warmup_fraction"
        )
    if saved.max_steps == max_steps:
        return max_steps
    if saved.name != "wsd":
        raise ValueError(
            f"train.max_steps={max_steps} differs from the checkpoint's {saved.max_steps}, and a cosine schedule "
            f"cannot be stretched mid-cycle; keep train.max_steps={saved.max_steps} (or train with scheduler=wsd, "
            f"whose stable phase can be extended)"
        )
    old_start, old_max = saved.decay_start, saved.max_steps
    saved.max_steps = max_steps
    if done > old_start or done > saved.decay_start:
        raise ValueError(
            f"cannot change the WSD horizon to train.max_steps={max_steps}: the checkpoint is at step {done}, past "
            f"the stable phase (old decay start {old_start}, new decay start {saved.decay_start}); extend from a "
            f"checkpoint taken before the decay"
        )
    return old_max
