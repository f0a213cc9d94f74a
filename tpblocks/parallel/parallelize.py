"""The one place that applies parallelism to a model: ``parallelize(model, dims, cfg, device) -> Parallelized``.

Every rank builds the same full model from the seed; ``parallelize`` then places it, in this order:

1. lane sharding (``dims.lane > 1``): ``shard_model`` with a ``MeshComm`` on the ``lane`` mesh (TP-block lanes,
   Megatron shards of classic layers), the shards DTensors on that mesh (plain under DDP over a dp axis);
2. layer parallelism (``dims.layer_parallel``): ``apply_layer_parallel`` runs the layer stack by MGRIT;
3. data parallelism over ``dp``, by ``trainer.backend``:
   * ``ddp``: torch DDP over the dp group (with lanes, each lane rank's dp peers hold the same shards); under
     MGRIT nothing (every rank already holds the full gradient);
   * ``fsdp``: FSDP2 ``fully_shard`` on the ``dp`` sub-mesh, per stage then the root (bf16 gathers when the
     run computes in bf16, ``TrainConfig.bf16_on``; fp32 master weights and reductions). FSDP shards the lane
     DTensors further over dp (2-D DTensors on the (dp, lane) mesh). ``fully_shard`` replaces the parameter
     objects and with them the lane gradient hooks of ``shard_model`` (on the parameters left plain: replicated
     KV heads, lane-shared norms); ``sync_grads`` applies those hooks to the dp-reduced gradients instead;
   * ``deepspeed``: nothing here; the engine (``tpblocks.train.distributed``) wraps the placed model;
4. ``torch.compile`` of the forward (``train.compile``; DeepSpeed has its own).

The returned object is all the training step needs: ``forward``, ``micro_batch(last)`` (the context of one
micro-batch's backward: gradient sync only on the last), ``sync_grads()``, ``clip_grad_norm_(max_norm)``, the
(dp, lane) ``mesh`` the checkpoint shards live on, and MGRIT's per-step hook and state (``step_end``,
``extra_state`` / ``load_extra_state``), which are no-ops without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .comm import MeshComm
from .dims import ParallelDims
from .placement import clip_grad_norm_, copy_dp_shard_
from .sharding import shard_model

if TYPE_CHECKING:  # tpblocks.config imports tpblocks.parallel: a type here only
    from tpblocks.config import RunConfig


def _no_context(last: bool) -> AbstractContextManager:
    return contextlib.nullcontext()


def _nothing() -> None:
    return None


@dataclass
class Parallelized:
    """What the training step needs of a placed model (module doc)."""

    module: nn.Module  # the placed model: parameters (the optimizer's), state dict, evaluation
    forward: Callable  # what a training step calls: module, or its DDP / compiled wrapper
    dims: ParallelDims
    mesh: DeviceMesh | None  # the (dp, lane) mesh of the checkpoint shards (None: nothing is sharded by hand)
    notes: list[str] = field(default_factory=list)  # one line per placement, for the run's log
    layer_parallel: Any = None  # tpblocks.parallel.mgrit.LayerParallel under MGRIT
    _micro_batch: Callable[[bool], AbstractContextManager] = _no_context
    _sync: Callable[[], None] = _nothing
    _clip: Callable[[float | None], float] | None = None
    # The training loss of ``forward``'s output and the targets; None: the plain cross-entropy of full logits.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Context of one micro-batch's forward and backward: gradients are synchronised on the ``last`` only."""
        return self._micro_batch(last)

    def sync_grads(self) -> None:
        """After the last micro-batch's backward: what the wrapper did not already reduce during it."""
        self._sync()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global gradient norm (every rank the same), clipped to ``max_norm`` when it is > 0."""
        return self._clip(max_norm if max_norm > 0 else None)

    def step_end(self, step: int, loss: float, loss_closure: Callable[[], torch.Tensor]) -> dict:
        """MGRIT's per-step monitor (collective): the true gradient error on its check steps, then its
        decision; returns the ``lp/*`` metrics ({} without MGRIT)."""
        lp = self.layer_parallel
        if lp is None or not lp.enabled:
            return {}
        if lp.should_check(step):
            lp.measure_grad_error(loss_closure)
        return lp.step_end(step, loss)

    def extra_state(self) -> dict | None:
        """What the checkpoint keeps beyond tensors: the MGRIT monitor's decisions (rank 0's; all ranks agree)."""
        return self.layer_parallel.state_dict() if self.layer_parallel is not None else None

    def load_extra_state(self, saved: dict | None) -> str | None:
        """Restore ``extra_state``; returns a line for the log (None when there is nothing to say)."""
        lp = self.layer_parallel
        if lp is None:
            return None
        if saved is None:
            return (
                "no MGRIT monitor state (written without layer_parallel): the monitor starts from "
                "layer_parallel's configured iterations"
            )
        lp.load_state_dict(saved)
        s = lp.monitor.state
        return f"MGRIT monitor restored: forward {s.fwd_iters} / adjoint {s.bwd_iters} iterations" + (
            ", serial" if s.serial else ""
        )


def parallel_dims(cfg: RunConfig, world: int, device_type: str = "cpu") -> ParallelDims:
    """This run's layout: MGRIT over the world, or the (dp, lane) grid of ``parallel.lane`` (ValueError when the
    lane degree does not divide the world)."""
    if cfg.layer_parallel.enabled:
        return ParallelDims(layer_parallel=True, world_size=world, device_type=device_type)
    dp, lane = cfg.parallel.dims(world)
    return ParallelDims(dp=dp, lane=lane, world_size=world, device_type=device_type)


def parallelize(model: nn.Module, dims: ParallelDims, cfg: RunConfig, device: torch.device) -> Parallelized:
    """Place ``model`` (the full model, the same on every rank) for this rank; see the module doc."""
    distributed = dist.is_available() and dist.is_initialized()
    backend = cfg.trainer.backend
    par = Parallelized(module=model, forward=model, dims=dims, mesh=None)
    if dims.lane_enabled:
        par.mesh = dims.mesh
        vocab_parallel = cfg.parallel.vocab_parallel_head
        # Lane shards are DTensors on the lane mesh (FSDP2 shards them further over dp, on the (dp, lane) mesh),
        # except under torch DDP over a dp axis, which takes no DTensor parameters. (Config refuses DeepSpeed with
        # lanes; MGRIT runs have no lane axis.)
        plain = backend == "ddp" and dims.dp_enabled
        model = par.module = par.forward = shard_model(
            model, MeshComm(dims.mesh), vocab_parallel_head=vocab_parallel, lane_dtensors=not plain
        )
        shards = "plain lane shards (torch DDP takes no DTensors)" if plain else "DTensor lane shards"
        par.notes.append(f"lane parallel: dp {dims.dp} x lane {dims.lane} (micro-batches per dp replica), {shards}")
    if dims.layer_parallel:
        from .mgrit import apply_layer_parallel

        par.layer_parallel = apply_layer_parallel(model, cfg.layer_parallel, None)
        lp = cfg.layer_parallel
        par.notes.append(
            f"layer parallel (MGRIT) over {dims.world_size} rank(s): levels {lp.levels}, cf {lp.cf}, iters "
            f"{lp.iters}, relax {lp.relax}; every rank reads the same batch"
        )
    if backend == "fsdp" and distributed:
        _fully_shard(par, cfg.train.bf16_on(device.type))
    elif backend != "deepspeed":  # ddp, and fsdp in one process (nothing to shard over): the model as it is
        _data_parallel(par, distributed, device)
    if cfg.train.compile and backend != "deepspeed":
        par.forward = torch.compile(par.forward)
    elif cfg.train.compile:
        par.notes.append("train.compile is ignored with trainer=deepspeed (set DeepSpeed's own compile options)")
    if dims.lane_enabled and model.vocab_parallel:  # parallel.vocab_parallel_head, or a DTP vocab_parallel head
        _train_vocab_parallel(par, model.comm)
    return par


def _train_vocab_parallel(par: Parallelized, comm: MeshComm) -> None:
    """The step takes this rank's logit shard (no all-gather of (b, s, V)) and the vocabulary-parallel loss."""
    from .vocab_parallel import vocab_parallel_cross_entropy

    forward = par.forward
    par.forward = lambda tokens_bs: forward(tokens_bs, gather_logits=False)
    par.loss = lambda logits_bsv, targets_bs: vocab_parallel_cross_entropy(logits_bsv, targets_bs, comm)
    par.notes.append(f"vocabulary-parallel head: {par.module.output.out_features} rows per lane rank")


def _torch_clip(model: nn.Module) -> Callable[[float | None], float]:
    def clip(max_norm: float | None) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf")))

    return clip


def _data_parallel(par: Parallelized, distributed: bool, device: torch.device) -> None:
    """trainer=ddp: DDP over the dp group (the world when every rank is a replica), its all-reduce overlapping
    the backward; a lane rank's dp peers hold the same shards. Under MGRIT nothing: it all-reduces the layer
    gradients itself."""
    model, dims = par.module, par.dims
    # With lanes, the global norm over all lanes / shards, the same on every rank (a per-shard norm would clip each
    # lane rank by a different factor).
    par._clip = (lambda max_norm: clip_grad_norm_(model, max_norm)) if dims.lane_enabled else _torch_clip(model)
    if dims.layer_parallel or not distributed or not dims.dp_enabled:
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    group = dims.mesh.get_group("dp") if dims.lane_enabled else None  # None: the default group, no mesh needed
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)
    par.forward = ddp
    # Gradients are all-reduced only on the last micro-batch (no_sync elsewhere): one sync per update.
    par._micro_batch = lambda last: contextlib.nullcontext() if last else ddp.no_sync()


def _fully_shard(par: Parallelized, bf16: bool) -> None:
    """trainer=fsdp: FSDP2 over the dp sub-mesh, each stage a unit, then the root (embedding, norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, dims = par.module, par.dims
    par.mesh = dims.mesh
    dp_mesh = dims.mesh["dp"]
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": dp_mesh} | ({"mp_policy": mp} if mp is not None else {})
    for stage in getattr(model, "stages", []):
        fully_shard(stage, **kwargs)
    fully_shard(model, **kwargs)
    hooks = dict(getattr(model, "lane_grad_hooks", {}))
    dp_group = dp_mesh.get_group()
    par._micro_batch = lambda last: _gradient_sync(model, last)
    par._sync = lambda: _lane_sums_after_fsdp(model, hooks)
    par._clip = lambda max_norm: clip_grad_norm_(model, max_norm, dp_group)
    precision = "bf16 gathers, fp32 reductions" if bf16 else "fp32"
    par.notes.append(f"FSDP2: fully_shard over dp {dims.dp} (lane {dims.lane}), {precision}")


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, last: bool):
    """FSDP2 reduce-scatters after every backward unless told not to: accumulate unsharded until the last."""
    model.set_requires_gradient_sync(last)
    yield


@torch.no_grad()
def _lane_sums_after_fsdp(model: nn.Module, hooks: dict[str, Callable]) -> None:
    """Apply each lane gradient hook of ``shard_model`` (a sum over the lane group of a parameter every lane rank
    holds) to the dp-reduced gradient: the hook sees the dp shards gathered, and this rank keeps its own."""
    params = dict(model.named_parameters())
    for name, hook in hooks.items():
        grad = params[name].grad
        if grad is not None:
            copy_dp_shard_(grad, hook(grad.full_tensor()))
