"""Communication points as calls on an injected object.

The model never imports ``torch.distributed``. Every place where hidden states of different lanes or
tensor-parallel shards meet is a call on a ``Communicator``. ``LocalComm`` (here) is the single-process
implementation: all lanes live in this process, so every call is local work — yet each call is still
*counted*, which is how tests check that a schedule does the number of synchronisations its formula says
(report Eq. 9-11). ``tpblocks/parallel/`` provides the distributed implementation with the same interface.

Calls (shapes: l lanes held here, b batch, s sequence, d lane width, h model width, f feature slice):
  tp_reduce(x)                  blocking   row-parallel output of a classic layer: sum over tp ranks
  tp_reduce_start(x)            async      the same sum, awaited later (Ladder residual); .wait() -> x
  lane_reduce(x_bsd)            blocking   sum over the lane ranks of per-rank partial sums (Parallel Track merge)
  lane_gather(x_bsf)            blocking   concatenate the merged slices of the lanes of all ranks -> x_bsh
  lane_sum_start(x_lbsd)        async      start summing a lane state over *all* lanes; .wait() -> x_bsd
  lane_sum_now(x_lbsd)          blocking   the same sum, now (DTP's "present" layers); every lane uses it
  vocab_gather(x_bsf)           blocking   a vocab-parallel head: concatenate the ranks' logit shards (or the
                                         few candidates each rank proposes for the next token)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class SyncCounter:
    """Counts communication points by kind. ``blocking`` are syncs on the critical path (Eq. 10's count).

    Calls inside ``torch.compile``d code are not counted: incrementing a Python int there is a side effect
    Dynamo specialises on, so every step would recompile (and after ``recompile_limit`` silently run eager).
    Count with an eager model; the count per forward is fixed by the config (``perfmodel.syncs_for_config``).
    """

    by_kind: Counter = field(default_factory=Counter)
    blocking: int = 0
    overlapped: int = 0

    def add(self, kind: str, blocking: bool) -> None:
        if torch.compiler.is_compiling():
            return
        self.by_kind[kind] += 1
        if blocking:
            self.blocking += 1
        else:
            self.overlapped += 1

    def reset(self) -> None:
        self.by_kind.clear()
        self.blocking = 0
        self.overlapped = 0

    def snapshot(self) -> dict:
        return {"blocking": self.blocking, "overlapped": self.overlapped, **dict(self.by_kind)}


@dataclass(frozen=True)
class SyncPlan:
    """Communication points of one forward (= one decode token): ``blocking`` on the critical path, ``overlapped``
    started and awaited later. Each stage class declares its own (``sync_plan(cfg)``, next to the calls it makes);
    ``tpblocks.models.model.sync_plan`` sums them for a config: the one count perfmodel, the audit and posthoc use.
    """

    blocking: int = 0
    overlapped: int = 0

    def __add__(self, other: SyncPlan) -> SyncPlan:
        return SyncPlan(self.blocking + other.blocking, self.overlapped + other.overlapped)

    def __mul__(self, times: int) -> SyncPlan:
        return SyncPlan(self.blocking * times, self.overlapped * times)


class PendingSum:
    """Handle of an asynchronous lane sum; ``wait()`` returns the sum over all lanes (b, s, d)."""

    def __init__(self, value: torch.Tensor):
        self._value = value

    def wait(self) -> torch.Tensor:
        return self._value


class Communicator:
    """Interface and single-process implementation (``LocalComm`` is this class).

    ``lane_rank``/``lane_world`` say which lanes this process holds: lanes
    ``[lane_rank * L / lane_world, (lane_rank + 1) * L / lane_world)``.
    ``tp_rank``/``tp_world`` say which shard of a classic layer it holds.
    """

    lane_rank: int = 0
    lane_world: int = 1
    tp_rank: int = 0
    tp_world: int = 1

    def __init__(self) -> None:
        self.counter = SyncCounter()
        self.enabled = True  # False turns every call into local work only (the no-communication ceiling)

    # Each method counts first, then delegates to a ``_``-prefixed implementation that subclasses override.
    def tp_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.counter.add("tp_reduce", blocking=True)
        return self._tp_reduce(x) if self.enabled else x

    def tp_reduce_start(self, x: torch.Tensor) -> PendingSum:
        self.counter.add("tp_reduce_async", blocking=False)
        return self._tp_reduce_start(x) if self.enabled else PendingSum(x)

    def lane_reduce(self, x_bsd: torch.Tensor) -> torch.Tensor:
        self.counter.add("lane_reduce", blocking=True)
        return self._lane_reduce(x_bsd) if self.enabled else x_bsd

    def lane_gather(self, x_bsf: torch.Tensor) -> torch.Tensor:
        self.counter.add("lane_gather", blocking=True)
        return self._lane_gather(x_bsf) if self.enabled else self._lane_gather_disabled(x_bsf)

    def lane_sum_start(self, x_lbsd: torch.Tensor) -> PendingSum:
        self.counter.add("lane_sum", blocking=False)
        if not self.enabled:
            return PendingSum(x_lbsd.sum(0))
        return self._lane_sum_start(x_lbsd)

    def lane_sum_now(self, x_lbsd: torch.Tensor) -> torch.Tensor:
        self.counter.add("lane_sum_now", blocking=True)
        if not self.enabled:
            return x_lbsd.sum(0)
        return self._lane_sum_start(x_lbsd).wait()  # its backward all-reduces too: each lane used the sum

    def vocab_gather(self, logits: torch.Tensor) -> torch.Tensor:
        self.counter.add("vocab_gather", blocking=True)
        if not self.enabled:  # keep shapes (and the shard-major layout) right: every rank's part is this one's
            return logits.repeat(*([1] * (logits.dim() - 1)), self.lane_world)
        return self._vocab_gather(logits)

    # ------------------------------------------------------------------ single-process implementation
    def _tp_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _tp_reduce_start(self, x: torch.Tensor) -> PendingSum:
        # Correct everywhere; a distributed subclass overrides it with a truly asynchronous all-reduce.
        return PendingSum(self._tp_reduce(x))

    def _lane_reduce(self, x_bsd: torch.Tensor) -> torch.Tensor:
        # A sum over the lane axis of one pseudo-lane is the all-reduce of the per-rank partial sums.
        return self._lane_sum_start(x_bsd.unsqueeze(0)).wait()

    def _lane_gather(self, x_bsf: torch.Tensor) -> torch.Tensor:
        return x_bsf

    def _lane_gather_disabled(self, x_bsf: torch.Tensor) -> torch.Tensor:
        # Without communication a rank only has its own slices; keep shapes right by repeating them.
        # expand, not repeat_interleave(int): the latter may read its output size back from the device (a host sync,
        # which breaks CUDA-graph capture of a no-communication decode step); the result is the same.
        if self.lane_world == 1:
            return x_bsf
        return x_bsf.unsqueeze(-1).expand(*x_bsf.shape, self.lane_world).flatten(-2)

    def _lane_sum_start(self, x_lbsd: torch.Tensor) -> PendingSum:
        return PendingSum(x_lbsd.sum(0))

    def _vocab_gather(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


LocalComm = Communicator
