"""An independent count of the collectives that really reach the backend.

``comm.counter`` counts the model's communication points as the model *asks* for them. ``CollectiveAudit``
counts what the backend is *given*: inside ``with CollectiveAudit() as audit:`` a ``TorchDispatchMode`` sees
every functional collective (``_c10d_functional::*``, what ``MeshComm`` issues) and every in-place c10d one
(``c10d::*``, what ``torch.distributed.all_reduce`` and friends issue), so a test (or a benchmark) can check
that the two agree and that the no-communication ceiling really issues none.

A functional collective counts as *asynchronous* (``async_ops``) when other work was dispatched between its
start and its ``wait_tensor``: it ran in the background of that work, as a delayed lane sum should. One waited
at once is blocking. This is judged from the op stream alone, not from what the communicator says.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

from ..models.config import ModelConfig
from ..models.model import sync_plan

_NAMESPACES = ("_c10d_functional", "c10d")


def _is_collective(namespace: str, op: str) -> bool:
    # Waits are not collectives of their own; "_"-prefixed functional ops are helpers (_wrap_tensor_autograd),
    # while c10d's "_"-prefixed ones are real (_allgather_base_ is dist.all_gather_into_tensor).
    return op != "wait_tensor" and not (namespace == "_c10d_functional" and op.startswith("_"))


def _key(t) -> int | None:
    """Identity of a collective's result across the ``AsyncCollectiveTensor`` wrapper: its storage."""
    inner = getattr(t, "elem", t)
    try:
        return inner.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError):
        return None


class CollectiveAudit(TorchDispatchMode):
    """Context manager counting collectives by op name (``calls``) and how many ran in the background."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.async_ops = 0
        self._pending: dict[int, int] = {}  # result storage -> ops dispatched since the collective started

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()
        self.async_ops = 0
        self._pending.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, op = func._schema.name.partition("::")
        out = func(*args, **(kwargs or {}))
        if namespace not in _NAMESPACES:
            for key in self._pending:
                self._pending[key] += 1
            return out
        if op == "wait_tensor":
            between = self._pending.pop(_key(args[0]), 0)
            self.async_ops += between > 0
        elif _is_collective(namespace, op):
            self.calls[op.rstrip("_")] += 1
            if namespace == "_c10d_functional":
                self._pending[_key(out)] = 0
        return out


def expected_syncs_per_token(cfg: ModelConfig) -> int:
    """Blocking syncs of one forward of any schedule: the model's sync plan (one place, report Eq. 9-11)."""
    return sync_plan(cfg).blocking
