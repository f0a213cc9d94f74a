"""An independent count of the collectives that really reach ``torch.distributed``.

``comm.counter`` counts the model's communication points as the model *asks* for them. ``CollectiveAudit``
counts what the backend is *given*: inside ``with CollectiveAudit() as audit:`` every
``torch.distributed.<collective>`` function is wrapped, so a test (or a benchmark) can check that the two
agree and that the no-communication ceiling really issues none.
"""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist

from ..infer.perfmodel import syncs_for_config
from ..models.config import ModelConfig

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
)


class CollectiveAudit:
    """Context manager counting calls to ``torch.distributed`` collectives by name (``calls``) and ``async_ops``."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.async_ops = 0
        self._saved: dict[str, object] = {}

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()
        self.async_ops = 0

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            if kwargs.get("async_op"):
                self.async_ops += 1
            return fn(*args, **kwargs)

        return counted

    def __enter__(self) -> CollectiveAudit:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()


def expected_syncs_per_token(cfg: ModelConfig) -> int:
    """Blocking syncs of one forward of any schedule: ``perfmodel.syncs_for_config`` (one formula, report Eq. 9-11)."""
    return syncs_for_config(cfg)
