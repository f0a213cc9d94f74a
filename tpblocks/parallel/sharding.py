"""``shard_model``: walk a full model's stages and keep this rank's share of each (the rules are in
``placement.py`` for TP blocks, classic layers and the head, and ``schedule_placement.py`` for PaLM, Ladder,
Kraken, Track and DTP). Its own module so that both rule modules are plain imports of it and neither imports the
other back."""

from __future__ import annotations

import weakref

import torch

from ..models.comm import Communicator
from ..models.layers import DecoderLayer
from ..models.model import TransformerLM
from ..models.tp_block import TPBlock
from .dims import check_lane_degree, check_vocab_parallel_head
from .placement import Copies, ShardSpec, _shard_classic, _shard_tp_block, _take, _tp_enter_hook, as_lane_dtensors_
from .schedule_placement import shard_dtp_head, shard_schedule_stage


def _shard_head(model: TransformerLM, rank: int, world: int, spec: ShardSpec) -> None:
    """Vocabulary rows ``[r V/G, (r+1) V/G)`` of the output projection (module doc); f at its input.

    The head reads the replicated final hidden state but each rank back-propagates only its vocabulary rows
    through it, so the gradient of that state is all-reduced (``comm.tp_enter``), as for any column shard.
    """
    vocab = model.cfg.vocab_size
    rows = torch.arange(rank * vocab // world, (rank + 1) * vocab // world)
    model.output.weight = _take(model.output.weight, 0, rows)  # unties a tied head: it gets its own slice
    model.output.out_features = rows.numel()
    model.output.register_forward_pre_hook(_tp_enter_hook(weakref.ref(model)))
    spec["output.weight"] = (0, rows)


def shard_model(
    model: TransformerLM, comm: Communicator, *, vocab_parallel_head: bool = False, lane_dtensors: bool = False
) -> TransformerLM:
    """Keep this rank's lanes / shards of a full model (in place) and attach ``comm``. Returns the model.

    Start from the *same* full weights on every rank of the lane group (same seed or the same checkpoint):
    each rank slices its share, so the sharded forward equals the single-process one. ``vocab_parallel_head``
    also splits the output projection by vocabulary rows (module doc). ``lane_dtensors``: make the parameters
    DTensors on the lane mesh (``as_lane_dtensors_``), what training asks for (``tpblocks.parallel.parallelize``:
    the optimizer, the norm, DCP and FSDP2 then see where each shard sits); the default keeps plain local shards,
    what decoding and the analyses read (no DTensor dispatch per weight read), and what DDP over a dp axis takes.
    """
    if getattr(model, "shard_spec", None) is not None:
        raise ValueError("this model is already sharded; shard a fresh full model")
    world, rank = comm.lane_world, comm.lane_rank
    if comm.tp_world != world or comm.tp_rank != rank:
        raise ValueError("tpblocks places classic-layer shards on the lane axis: comm.tp_* must equal comm.lane_*")
    check_lane_degree(model.cfg, world)
    if vocab_parallel_head:  # before any stage is cut: a refused model stays whole
        check_vocab_parallel_head(model.cfg, world)
    spec: ShardSpec = {}
    copies: Copies = {}
    model.lane_grad_hooks = {}
    if world > 1:
        model_ref = weakref.ref(model)
        for i, stage in enumerate(model.stages):
            prefix = f"stages.{i}"
            if shard_schedule_stage(stage, prefix, comm, spec, copies, model_ref):
                continue
            if isinstance(stage, TPBlock):
                _shard_tp_block(stage, prefix, rank, world, spec)
                stage.register_forward_pre_hook(_tp_enter_hook(model_ref))
            elif isinstance(stage, DecoderLayer):
                _shard_classic(stage, prefix, comm, spec, copies, model_ref)
                stage.attn.register_forward_pre_hook(_tp_enter_hook(model_ref))
                stage.ffn.register_forward_pre_hook(_tp_enter_hook(model_ref))
            else:  # pragma: no cover - the model only builds these two stage types
                raise TypeError(f"cannot place stage {prefix} of type {type(stage).__name__}")
        if model.cfg.arch == "dtp":
            shard_dtp_head(model, rank, world, spec)
        if vocab_parallel_head:
            _shard_head(model, rank, world, spec)
    model.shard_spec = spec
    model.shard_copies = copies
    model.comm = comm
    if lane_dtensors and world > 1 and getattr(comm, "mesh", None) is not None:  # not a test's stand-in comm
        as_lane_dtensors_(model, comm)
    return model
