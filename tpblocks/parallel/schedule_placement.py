"""Placement of the other communication schedules over a lane group: PaLM, Ladder, Kraken, Parallel Track.

``shard_model`` (``placement.py``) hands every stage to ``shard_schedule_stage`` first; it places the stages of
``tpblocks.models.schedules`` and Track blocks and returns False for the others:

  stage                    what a rank keeps                                    collectives (forward)
  ParallelLayer (PaLM)     Megatron shards of attention + FFN, like a classic   1 ``tp_reduce`` (g) of attn + ffn
                           layer; the shared norm is replicated
  LadderStack              every inner DecoderLayer sharded like a classic one  2 per layer, ``tp_reduce_start``:
                                                                                async all-reduce, awaited later
  KrakenBlock              lanes [r G/W, (r+1) G/W) of every LaneLayer          L-1 async lane sums + 1 gather
                           (lane_offset set); ``proj`` replicated
  TPBlock recipe "track"   its lanes, as for any TP block                       1 ``lane_reduce`` per block (g)
  DTPStack (Laneformer)    lanes [r L/W, (r+1) L/W) of every layer; norms       2 per *present* layer (blocking),
                           shared by all lanes stay whole (gradient summed)     2 per sending *past* layer (async)
    its lane head          replicate: whole; lane: its lanes' column blocks;    1 (``lane_reduce`` / ``vocab_gather``)
                           vocab_parallel: its lanes' vocabulary rows;
                           per-lane final norm: its lanes

Backward follows Megatron's f/g pairs: ``comm.tp_enter`` (f: identity forward, all-reduce backward) enters every
sharded attention / FFN and every lane block, and the forward sums are g (all-reduce forward, identity backward).

Parallel Track needs one more piece. Its block returns ``x + lane_reduce(sum_l (lane_l - x))``: the residual
``x`` is read *inside* the block, so the f applied at the block's entry would sum its (replicated) gradient once
per rank. A zero-valued term ``-(W-1)/W * (x - x.detach())`` added to the block output (a forward hook) takes
back exactly that surplus after the all-reduce, without changing a single bit of the forward value.

The collectives these stages call (``MeshComm._tp_reduce_start``, an asynchronous all-reduce attached to
autograd as g, and ``_lane_reduce``) live with the others in ``comm.py``.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..models.comm import Communicator
from ..models.dtp import DTPStack
from ..models.model import TransformerLM
from ..models.schedules import KrakenBlock, LadderStack, ParallelLayer
from ..models.tp_block import TPBlock
from .placement import (
    Copies,
    ShardSpec,
    _lane_grad_hook,
    _lane_index,
    _live_comm,
    _shard_classic,
    _shard_lanes,
    _shard_tp_block,
    _sum_grad_hook,
    _take,
    _tp_enter_hook,
)

SCHEDULE_STAGES = (ParallelLayer, LadderStack, KrakenBlock, DTPStack)


# ---------------------------------------------------------------------------------------------- sharding
def _shard_megatron(layer: nn.Module, prefix: str, comm: Communicator, spec: ShardSpec, copies: Copies,
                    model_ref: weakref.ref) -> None:  # fmt: skip
    """Column/row shards of ``layer.attn`` and ``layer.ffn`` (any layer holding those two, like a DecoderLayer)."""
    _shard_classic(layer, prefix, comm, spec, copies, model_ref)
    layer.attn.register_forward_pre_hook(_tp_enter_hook(model_ref))
    layer.ffn.register_forward_pre_hook(_tp_enter_hook(model_ref))


def _track_residual_hook(model_ref: weakref.ref):
    """Forward hook of a sharded Track block: remove the W-fold count of the residual's gradient (module doc)."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor):
        comm = _live_comm(model_ref)
        x_bsh = args[0] if args else None
        if comm is None or x_bsh is None or not torch.is_grad_enabled():
            return None
        if not x_bsh.requires_grad:
            return None
        surplus = (comm.lane_world - 1) / comm.lane_world
        return out - surplus * (x_bsh - x_bsh.detach())  # value: out exactly; gradient to x: -surplus x grad

    return hook


def shard_schedule_stage(
    stage: nn.Module, prefix: str, comm: Communicator, spec: ShardSpec, copies: Copies, model_ref: weakref.ref
) -> bool:
    """Shard ``stage`` in place if it is a schedule stage (or a Track block); False leaves it to ``shard_model``."""
    rank, world = comm.lane_rank, comm.lane_world
    if isinstance(stage, ParallelLayer):
        _shard_megatron(stage, prefix, comm, spec, copies, model_ref)
    elif isinstance(stage, LadderStack):
        for j, layer in enumerate(stage.layers):
            _shard_megatron(layer, f"{prefix}.layers.{j}", comm, spec, copies, model_ref)
    elif isinstance(stage, KrakenBlock):
        # Lanes as in a TP block; ``proj`` reads the gathered (replicated) lanes: whole on every rank.
        _shard_lanes(stage, prefix, rank, world, spec)
        stage.register_forward_pre_hook(_tp_enter_hook(model_ref))
    elif isinstance(stage, DTPStack):  # the replicated input is copied into lanes that each rank runs alone
        _shard_lanes(stage, prefix, rank, world, spec, model_ref)
        stage.register_forward_pre_hook(_tp_enter_hook(model_ref))
    elif isinstance(stage, TPBlock) and stage.recipe == "track":
        # Lanes are sliced like any TP block. lane_offset only steers Burger's own-slice write and Sandwich's
        # split, neither of which Track uses (copy in, sum of updates out), so it is bookkeeping here.
        _shard_tp_block(stage, prefix, rank, world, spec)
        stage.register_forward_pre_hook(_tp_enter_hook(model_ref))
        stage.register_forward_hook(_track_residual_hook(model_ref))
    else:
        return False
    return True


def shard_dtp_head(model: TransformerLM, rank: int, world: int, spec: ShardSpec) -> None:
    """This rank's part of a DTP lane head (module doc): the final norm and output weights of its lanes.

    A ``replicate`` head reads the (replicated) lane mean: it stays whole, like any replicated head.
    """
    cfg = model.cfg
    lanes = _lane_index(cfg.lane_count, rank, world)
    if model.norm.weight.dim() == 2:  # one final norm per lane
        model.norm.weight = _take(model.norm.weight, 0, lanes)
        spec["norm.weight"] = (0, lanes)
    elif not cfg.pre_norm_lane_agg:  # one norm every lane applies: each rank's gradient covers only its lanes
        model_ref = weakref.ref(model)
        _lane_grad_hook(model_ref, "norm.weight", model.norm.weight, _sum_grad_hook(model_ref, "shared_norm_grad"))
    if cfg.lm_head_type == "replicate":
        return
    h, rows_per_lane = cfg.hidden_size, cfg.vocab_size // cfg.lane_count
    dim, per_lane = (1, h) if cfg.lm_head_type == "lane" else (0, rows_per_lane)
    index = (lanes[:, None] * per_lane + torch.arange(per_lane)[None, :]).reshape(-1)
    model.output.weight = _take(model.output.weight, dim, index)
    model.output.out_features, model.output.in_features = model.output.weight.shape
    spec["output.weight"] = (dim, index)
