"""``MeshComm``: the model's communication points as autograd-aware functional collectives.

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

With autograd on (training) each pair is DTensor's own redistribution on the 1-D lane mesh, entered and left on
plain local tensors: f = Replicate in, ``to_local(grad_placements=[Partial()])``; g = Partial -> Replicate;
the gather = Shard(-1) -> Replicate. A delayed sum runs outside autograd (any transport, in the background) and
is attached at reception with f's backward when it needs one. A gradient hook counts each backward collective
in ``comm.backward_counter``. Without autograd (decode) the collectives below are called directly.

Collectives are ``torch.distributed._functional_collectives`` (out of place, traceable), so a compiled decode
step (``tpblocks.infer.engine``) contains every merge, Megatron reduce and delayed lane sum in its graph. A
started sum is an ``AsyncCollectiveTensor`` awaited explicitly with ``wait_tensor`` at reception: eagerly the
collective runs in the background of the layers in between; compiled, inductor places the wait there. They
run the same backend collectives as ``dist.all_reduce`` / ``all_gather``, so results are bit-identical.
``tpblocks.parallel.audit.CollectiveAudit`` counts what really reaches the backend (a dispatch mode); backward
collectives are counted in ``comm.backward_counter``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from ..models.comm import Communicator, PendingSum, SyncCounter


# ---------------------------------------------------------------------------------------------- collectives
def all_reduce_start(x: torch.Tensor, group) -> torch.Tensor:
    """Start a sum of ``x`` over ``group``; the result must go through ``funcol.wait_tensor`` before use."""
    return funcol.all_reduce(x.contiguous(), "sum", group)


def all_reduce_now(x: torch.Tensor, group) -> torch.Tensor:
    """A new tensor holding the sum of ``x`` over ``group`` (``x`` itself untouched)."""
    return funcol.wait_tensor(all_reduce_start(x, group))


# torch 2.13 renamed all_gather_tensor (deprecated there); the CUDA path must also run on torch 2.11.
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_gather_last_dim(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Concatenate ``x`` of every rank (in rank order) along the last dim."""
    stacked = funcol.wait_tensor(_all_gather_dim0(x.contiguous(), 0, group))  # (world * d0, ...)
    parts = stacked.view(world, *x.shape)
    return parts.movedim(0, -2).reshape(*x.shape[:-1], world * x.shape[-1])


# ---------------------------------------------------------------------------------------------- autograd pairs
# Megatron's f/g are DTensor's own redistributions, entered and left on plain local tensors (``run_check=False``:
# the placements are asserted, not checked with a collective). torch documents the gradient placements used here
# in ``DTensor.from_local``: a Partial input always gets a Replicate gradient (g: identity backward), and
# ``to_local(grad_placements=[Partial()])`` says each rank's gradient is one term of a sum (f: all-reduce backward).
def _count_backward(y: torch.Tensor, comm: MeshComm, kind: str) -> torch.Tensor:
    """Count ``kind`` in ``comm.backward_counter`` when the gradient of ``y`` is computed (i.e. when the backward
    collective behind ``y`` runs). Not inside compiled code: the counters skip it there (``SyncCounter.add``)."""
    if not torch.compiler.is_compiling():
        y.register_hook(lambda grad: comm.backward_counter.add(kind, blocking=True))
    return y


def copy_to_lanes(x: torch.Tensor, comm: MeshComm, kind: str) -> torch.Tensor:
    """f: identity forward, all-reduce backward (every rank back-propagated only its own share through ``x``)."""
    y = DTensor.from_local(x, comm.mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
    return _count_backward(y, comm, kind)


def reduce_from_lanes(x: torch.Tensor, comm: MeshComm) -> torch.Tensor:
    """g: all-reduce forward, identity backward (the sum is replicated, so is its gradient)."""
    partial = DTensor.from_local(x, comm.mesh, [Partial()], run_check=False)
    return partial.redistribute(comm.mesh, [Replicate()]).to_local()


def gather_last_dim(x: torch.Tensor, comm: MeshComm) -> torch.Tensor:
    """All-gather along the last dim (ranks in order); backward keeps this rank's slice of the gradient."""
    shards = DTensor.from_local(x, comm.mesh, [Shard(x.ndim - 1)], run_check=False)
    return shards.redistribute(comm.mesh, [Replicate()]).to_local()


class _Attach(torch.autograd.Function):
    """Puts a finished sum back into the graph: value = ``total``, gradient passed unchanged to ``local``.

    Not a collective (DTensor has no op for "this value, that gradient path"): the sum itself ran outside
    autograd on a detached copy, so any transport can run it in the background (``PendingAllReduce``).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        return total.view_as(total)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def attach_sum(local: torch.Tensor, total: torch.Tensor, comm: MeshComm, reduce_grad: bool) -> torch.Tensor:
    """``total`` (the lane sum of ``local``) with a gradient path to ``local``.

    With ``reduce_grad`` the total is used differently by every rank (delayed reception), so d loss / d (this
    rank's part) is the sum over ranks of their gradients of the total: f's all-reduce. Without it the sum is
    consumed identically by every rank (a replicated residual stream, Ladder), so the gradient of each rank's
    part is the (replicated) gradient of the sum: identity.
    """
    if reduce_grad:
        local = copy_to_lanes(local, comm, "lane_sum")
    return _Attach.apply(local, total)


# ------------------------------------------------------------------------------------------------ pending sums
class PendingAllReduce(PendingSum):
    """Handle of an in-flight sum over the lane group: ``wait()`` joins it and returns the total (b, s, d).

    ``reduce_grad``: whether the backward of the sum all-reduces (``attach_sum``).
    """

    def __init__(self, local: torch.Tensor, comm: MeshComm, reduce_grad: bool = True):
        super().__init__(local)
        self._comm = comm
        self._reduce_grad = reduce_grad
        self._done: torch.Tensor | None = None
        if comm.lane_sum_method == "async":
            self._total = all_reduce_start(local.detach(), comm.group)
            self._work = None
        else:  # GPU transports (symmetric-memory one-shot all-reduce) live with the kernels; eager only
            from kernels.comm import delayed_all_reduce_start

            self._work = delayed_all_reduce_start(local.detach(), comm.group, comm.lane_sum_method)
            self._total = None

    def wait(self) -> torch.Tensor:
        if self._done is None:
            total = self._work.wait() if self._work is not None else funcol.wait_tensor(self._total)
            local = self._value
            if torch.is_grad_enabled() and local.requires_grad:
                total = attach_sum(local, total, self._comm, self._reduce_grad)
            self._done = total
        return self._done


# ---------------------------------------------------------------------------------------------- communicator
def _lane_mesh(mesh_or_group, dim: str) -> DeviceMesh:
    """The 1-D device mesh of the lane group: ``mesh[dim]`` of a ``DeviceMesh``, else one built on the
    ``ProcessGroup`` (``None``: the default group). DTensor's f/g need a mesh; the collectives use its group."""
    if isinstance(mesh_or_group, DeviceMesh):
        names = mesh_or_group.mesh_dim_names or ()
        if dim not in names:
            raise ValueError(f"the device mesh has dims {names}; MeshComm needs a {dim!r} dim")
        return mesh_or_group[dim] if len(names) > 1 else mesh_or_group
    group = mesh_or_group if mesh_or_group is not None else dist.group.WORLD
    device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device_type, mesh_dim_names=(dim,))


class MeshComm(Communicator):
    """Communicator over the lane (= tensor-parallel) group of a device mesh.

    ``mesh_or_group`` is a ``DeviceMesh`` with a ``"lane"`` dim (``ParallelDims.build_mesh``), a
    ``ProcessGroup`` of the lane group, or ``None`` for the default group (every rank in one lane group).
    ``enabled=False`` (set on the instance) keeps every call local: the no-communication ceiling.
    ``lane_sum_method``: "async" (functional all-reduce, any backend, traceable) or, on CUDA, "auto"/"symm_mem"
    to run the delayed sums eagerly with ``kernels.comm`` (one-shot symmetric-memory all-reduce).
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
        self.mesh = _lane_mesh(mesh_or_group, dim)
        self.group = self.mesh.get_group()
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
        return copy_to_lanes(x, self, "tp_enter")

    # ------------------------------------------------------------------ Communicator implementation
    # Without autograd (decode) the collectives are called directly: nothing to attach, and a plain call is
    # what a compiled decode step traces.
    def _tp_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.lane_world == 1:
            return x
        if not torch.is_grad_enabled():
            return all_reduce_now(x, self.group)
        return reduce_from_lanes(x, self)

    def _lane_gather(self, x_bsf: torch.Tensor) -> torch.Tensor:
        if self.lane_world == 1:
            return x_bsf
        if not torch.is_grad_enabled():
            return all_gather_last_dim(x_bsf, self.group, self.lane_world)
        return gather_last_dim(x_bsf, self)

    def _lane_sum_start(self, x_lbsd: torch.Tensor) -> PendingSum:
        local_bsd = x_lbsd.sum(0)
        if self.lane_world == 1:
            return PendingSum(local_bsd)
        return PendingAllReduce(local_bsd, self)

    def _vocab_gather(self, logits: torch.Tensor) -> torch.Tensor:
        return self._lane_gather(logits)

    # Schedules: Ladder's asynchronous row-parallel sum (identity backward), Track's blocking merge.
    def _tp_reduce_start(self, x: torch.Tensor) -> PendingSum:
        if self.tp_world == 1:
            return PendingSum(x)
        return PendingAllReduce(x, self, reduce_grad=False)

    def _lane_reduce(self, x_bsd: torch.Tensor) -> torch.Tensor:
        # The base class builds it from a lane sum, whose backward all-reduces (right for delayed reception,
        # where every rank uses the total differently); Track's merged state is replicated: g, identity backward.
        return self._tp_reduce(x_bsd)
