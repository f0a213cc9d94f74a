"""``MeshComm``: the model's communication points as autograd-aware ``torch.distributed`` collectives.

The model calls ``comm.tp_reduce`` / ``lane_gather`` / ``lane_sum_start`` (``tpblocks.models.comm``); the base
class counts each call, this subclass runs it over the lane group of the device mesh. Forward and backward
of each collective are a conjugate pair (Megatron's f/g):

  call / hook        forward                                  backward
  tp_reduce    (g)   all-reduce the row-parallel partial sums  identity (the output is replicated)
  tp_enter     (f)   identity (the input is replicated)        all-reduce: each rank saw only its shards' share
  lane_gather        all-gather the ranks' merged slices       keep this rank's slice of the gradient
  lane_sum_start     async all-reduce of this rank's lane sum  all-reduce: every rank's reception used the total

``tp_enter`` is not a model call: ``tpblocks.parallel.placement`` applies it from outside, as a forward
pre-hook on every TP block and on the attention/FFN of every sharded classic layer.

Collectives are looked up as ``torch.distributed.<name>`` at call time (never bound at import) so
``tpblocks.parallel.audit.CollectiveAudit`` can count what really reaches the backend and tests can check
that ``comm.counter`` is honest. Backward collectives are counted in ``comm.backward_counter``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.comm import Communicator, PendingSum, SyncCounter


def _sum_over_lane_group(x: torch.Tensor, comm: MeshComm) -> torch.Tensor:
    """A new tensor holding the sum of ``x`` over the lane group (``x`` itself untouched)."""
    total = x.contiguous().clone()
    dist.all_reduce(total, group=comm.group)
    return total


class _ReduceFromLanes(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: MeshComm) -> torch.Tensor:
        return _sum_over_lane_group(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _CopyToLanes(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: MeshComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.comm.backward_counter.add("tp_enter", blocking=True)
        return _sum_over_lane_group(grad, ctx.comm), None


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim (ranks in order); backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: MeshComm) -> torch.Tensor:
        ctx.comm = comm
        ctx.width = x.shape[-1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(comm.lane_world)]
        dist.all_gather(parts, x, group=comm.group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm: MeshComm = ctx.comm
        start = comm.lane_rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


class _AttachSum(torch.autograd.Function):
    """Puts a finished lane sum back into the graph: value = ``total``, gradient flows to ``local``.

    The collective itself runs outside autograd on a detached copy (so any transport can run it in the
    background). The total is used by every rank, so d loss / d (this rank's part) is the sum over ranks of
    their gradients of the total: an all-reduce.
    """

    @staticmethod
    def forward(ctx, local_bsd: torch.Tensor, total_bsd: torch.Tensor, comm: MeshComm) -> torch.Tensor:
        ctx.comm = comm
        return total_bsd.view_as(total_bsd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.comm.backward_counter.add("lane_sum", blocking=True)
        return _sum_over_lane_group(grad, ctx.comm), None, None


class PendingAllReduce(PendingSum):
    """Handle of an in-flight lane sum: ``wait()`` blocks on the collective and returns the total (b, s, d)."""

    def __init__(self, local_bsd: torch.Tensor, comm: MeshComm):
        super().__init__(local_bsd)
        self._comm = comm
        self._done: torch.Tensor | None = None
        if comm.lane_sum_method == "async":
            self._total = local_bsd.detach().contiguous().clone()
            self._work = dist.all_reduce(self._total, group=comm.group, async_op=True)
        else:  # GPU transports (symmetric-memory one-shot all-reduce) live with the kernels
            from kernels.comm import delayed_all_reduce_start

            self._work = delayed_all_reduce_start(local_bsd.detach(), comm.group, comm.lane_sum_method)
            self._total = None

    def wait(self) -> torch.Tensor:
        if self._done is None:
            if self._total is None:  # kernels.comm handle: wait() returns the sum
                total = self._work.wait()
            else:
                self._work.wait()
                total = self._total
            local = self._value
            if torch.is_grad_enabled() and local.requires_grad:
                total = _AttachSum.apply(local, total, self._comm)
            self._done = total
        return self._done


class MeshComm(Communicator):
    """Communicator over the lane (= tensor-parallel) group of a device mesh.

    ``mesh_or_group`` is a ``DeviceMesh`` with a ``"lane"`` dim (``ParallelDims.build_mesh``), a
    ``ProcessGroup`` of the lane group, or ``None`` for the default group (every rank in one lane group).
    ``enabled=False`` (set on the instance) keeps every call local: the no-communication ceiling.
    ``lane_sum_method``: "async" (``all_reduce(async_op=True)``, any backend) or, on CUDA, "auto"/"symm_mem" to
    run the delayed sums with ``kernels.comm`` (one-shot symmetric-memory all-reduce; not visible to
    ``CollectiveAudit``, which only sees ``torch.distributed`` calls).
    """

    def __init__(self, mesh_or_group=None, dim: str = "lane", lane_sum_method: str = "async"):
        super().__init__()
        if lane_sum_method not in ("async", "auto", "symm_mem"):
            raise ValueError(f"lane_sum_method={lane_sum_method!r}; use 'async', 'auto' or 'symm_mem' (kernels.comm)")
        self.lane_sum_method = lane_sum_method
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "MeshComm needs torch.distributed initialised; call tpblocks.parallel.init_distributed() first "
                "(for one process use tpblocks.models.comm.LocalComm)"
            )
        group = mesh_or_group
        if hasattr(mesh_or_group, "get_group"):  # a DeviceMesh
            names = mesh_or_group.mesh_dim_names or ()
            if dim not in names:
                raise ValueError(f"the device mesh has dims {names}; MeshComm needs a {dim!r} dim")
            group = mesh_or_group.get_group(dim)
        self.group = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(self.group)
        world = dist.get_world_size(self.group)
        # One axis for both: a rank's lanes and its classic-layer shards have the same index.
        self.lane_rank = self.tp_rank = rank
        self.lane_world = self.tp_world = world
        self.backward_counter = SyncCounter()

    @property
    def distributed(self) -> bool:
        """True when calls really cross processes (more than one rank in the group and communication on)."""
        return self.enabled and self.lane_world > 1

    # ------------------------------------------------------------------ hook applied by placement (f)
    def tp_enter(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward; all-reduce of the gradient in backward. Not a forward sync, so not counted there."""
        if not self.distributed or not torch.is_grad_enabled() or not x.requires_grad:
            return x
        return _CopyToLanes.apply(x, self)

    # ------------------------------------------------------------------ Communicator implementation
    def _tp_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.lane_world == 1:
            return x
        return _ReduceFromLanes.apply(x, self)

    def _lane_gather(self, x_bsf: torch.Tensor) -> torch.Tensor:
        if self.lane_world == 1:
            return x_bsf
        return _GatherLastDim.apply(x_bsf, self)

    def _lane_sum_start(self, x_lbsd: torch.Tensor) -> PendingSum:
        local_bsd = x_lbsd.sum(0)
        if self.lane_world == 1:
            return PendingSum(local_bsd)
        return PendingAllReduce(local_bsd, self)

    def _vocab_gather(self, logits: torch.Tensor) -> torch.Tensor:
        if self.lane_world == 1:
            return logits
        return _GatherLastDim.apply(logits, self)

    # Schedules (tpblocks.parallel.schedule_placement): Ladder's asynchronous row-parallel sum, Track's merge.
    def _tp_reduce_start(self, x: torch.Tensor) -> PendingSum:
        from .schedule_placement import start_tp_reduce

        return start_tp_reduce(x, self)

    def _lane_reduce(self, x_bsd: torch.Tensor) -> torch.Tensor:
        from .schedule_placement import lane_reduce

        return lane_reduce(x_bsd, self)
