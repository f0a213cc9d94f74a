"""GPU delayed all-reduce: the non-blocking lane sum behind ``Communicator.lane_sum_start``.

A delayed exchange (``tpblocks.models.delayed``) starts a sum over lanes after layer d and needs it only
``comm_length`` layers later, so the all-reduce should run behind those layers. Two transports:

  "async"     ``torch.distributed.all_reduce(async_op=True)`` on a copy; ``wait()`` joins it. With NCCL the
              reduction runs on NCCL's own stream and overlaps the lane layers; with gloo (CPU) it runs on
              gloo's thread (TOOLCHAIN.md: little real overlap on 2 cores, but the semantics are the same).
  "symm_mem"  (CUDA, when the installed torch has ``torch.distributed._symmetric_memory`` and the
              ``symm_mem::one_shot_all_reduce`` op) a one-shot all-reduce for small messages: every rank
              reads all peers' buffers directly over NVLink and sums, one kernel, no NCCL ring protocol.
              Decode-sized exchanges (b*s*h of a few KiB) are latency-bound, where this wins. It is issued on a
              side stream so the caller's stream keeps computing; ``wait()`` makes the caller's stream wait.
  "auto"      symm_mem for CUDA messages <= ``SMALL_MESSAGE_BYTES`` when available, async otherwise.

Tested here: the async path over gloo on CPU (tests/kernels/test_kernel_comm.py). NOT tested here: NCCL,
CUDA streams, symmetric memory (no GPU on the development machine). Gradients: these collectives are not
autograd-aware; ``tpblocks.parallel`` wraps them (the backward of a sum over lanes is the same sum of grads).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SMALL_MESSAGE_BYTES = 512 * 1024  # one-shot beats a ring below ~0.5 MiB on NVLink (PyTorch's own threshold range)
METHODS = ("auto", "async", "symm_mem")


class PendingSum:
    """Handle of a started sum; ``wait()`` returns the all-reduced tensor (same shape and dtype as the input)."""

    def __init__(self, result: torch.Tensor, work=None, event: torch.cuda.Event | None = None):
        self._result = result
        self._work = work
        self._event = event

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._event is not None:
            torch.cuda.current_stream(self._result.device).wait_event(self._event)
            self._event = None
        return self._result

    def is_completed(self) -> bool:
        if self._work is not None:
            return self._work.is_completed()
        return self._event is None or self._event.query()


def symmetric_memory_available(x: torch.Tensor, group=None) -> bool:
    """Whether the one-shot symmetric-memory all-reduce can run for ``x`` on ``group`` in this torch build."""
    if not (x.is_cuda and dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_backend(group) != "nccl":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401

        return hasattr(torch.ops.symm_mem, "one_shot_all_reduce")
    except (ImportError, AttributeError, RuntimeError):
        return False


def pick_method(x: torch.Tensor, group=None, method: str = "auto") -> str:
    """The transport ``delayed_all_reduce_start`` will use for ``x``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}")
    if method == "symm_mem" and not symmetric_memory_available(x, group):
        raise RuntimeError(
            "method='symm_mem' needs a CUDA tensor, an initialised NCCL process group and a torch build with "
            "torch.distributed._symmetric_memory (symm_mem::one_shot_all_reduce); use method='async'"
        )
    if method != "auto":
        return method
    small = x.numel() * x.element_size() <= SMALL_MESSAGE_BYTES
    return "symm_mem" if small and symmetric_memory_available(x, group) else "async"


_workspaces: dict[tuple, torch.Tensor] = {}
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _symm_buffer(x: torch.Tensor, group) -> torch.Tensor:
    """A symmetric buffer shaped like ``x``, allocated and exchanged (rendezvous) once per shape/dtype/group."""
    from torch.distributed import _symmetric_memory as symm_mem

    group = group or dist.group.WORLD
    key = (tuple(x.shape), x.dtype, x.device, group.group_name)
    buf = _workspaces.get(key)
    if buf is None:
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older builds, a no-op or absent later
            symm_mem.enable_symm_mem_for_group(group.group_name)
        buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, group)
        _workspaces[key] = buf
    return buf


def delayed_all_reduce_start(x: torch.Tensor, group=None, method: str = "auto") -> PendingSum:
    """Start ``sum over ranks of x`` without blocking; ``.wait()`` on the result when the sum is needed.

    ``x`` itself is not modified. ``group`` is the lane group (None = the default group).
    """
    chosen = pick_method(x, group, method)
    if chosen == "async":
        out = x.detach().clone()
        return PendingSum(out, dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group, async_op=True))
    # symm_mem: copy into the symmetric buffer and reduce on a side stream, ordered after x's producer.
    main = torch.cuda.current_stream(x.device)
    side = _side_streams.setdefault(x.device, torch.cuda.Stream(x.device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        buf = _symm_buffer(x, group)
        buf.copy_(x.detach())
        name = (group or dist.group.WORLD).group_name
        out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
        event = torch.cuda.Event()
        event.record(side)
    out.record_stream(main)
    return PendingSum(out, event=event)


def delayed_all_reduce(x: torch.Tensor, group=None, method: str = "auto") -> torch.Tensor:
    """Blocking convenience form: start and wait."""
    return delayed_all_reduce_start(x, group, method).wait()
