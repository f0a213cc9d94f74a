"""Parallelising a pre-trained Llama: sub-layer / layer parallelism, iterative and averaged (Scotti & Carman).

Given a trained stack of decoder layers, a *parallel group* of ``rate`` consecutive layers is made to read the
same input instead of each other's output:

  level "sub-layer"  x <- x + agg_i attn_i(attn_norm_i(x));  x <- x + agg_i ffn_i(ffn_norm_i(x))
  level "layer"      x <- x + agg_i (layer_i(x) - x)          (each layer keeps attention -> FFN inside)
  averaged           agg = mean instead of sum (keeps the residual-stream scale)
  iterative          the group is applied ``rate`` times in a row, recovering the original depth

The 16 configurations of the paper's Table 1 are ``TABLE1[1..16]`` (IDs as in the paper), also reachable by a
descriptive name such as ``"r2-layer-iter-avg"`` (see ``config_by_name``).

Nothing in ``tpblocks/models`` changes: ``parallelise`` deep-copies the model and replaces the entries of
``model.stages`` in ``[start, end)`` with ``ParallelGroup`` stages that hold the original ``DecoderLayer``s.

Communication points (counted by the model's ``Communicator``; they are what a 2-way tensor-parallel run would
all-reduce): a sub-layer group sums its attentions' partial outputs locally and reduces once, likewise its FFNs,
so 2 syncs per pass instead of 2 * rate. A layer group reduces the ``rate`` attention outputs stacked in one
call, then the summed FFN outputs in one call: also 2 per pass. An iterative group makes ``rate`` passes.

KV cache: pass 0 of a group keeps each layer's original cache slot; later passes of an iterative group see
different inputs, so they get fresh slots appended after the model's existing ones (``model.n_cache_slots``
grows and ``model.new_cache()`` sizes itself accordingly).

Shape legend: b batch, s sequence, h hidden, r rate (group members).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tpblocks.models.comm import Communicator
from tpblocks.models.kv_cache import KVCache
from tpblocks.models.layers import DecoderLayer
from tpblocks.models.model import TransformerLM

Level = Literal["sub-layer", "layer"]
LEVELS = ("sub-layer", "layer")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """One parallelisation scheme (a column of Table 1)."""

    rate: int = 2
    level: Level = "sub-layer"
    iterative: bool = False
    averaged: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rate, int) or self.rate < 1:
            raise ValueError(f"rate={self.rate!r} must be a positive integer (the paper uses 2 or 4; 1 = unchanged)")
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} must be one of {LEVELS}")

    @property
    def name(self) -> str:
        """Descriptive name, e.g. ``r4-sub-layer-iter-avg``; accepted by ``config_by_name``."""
        parts = [f"r{self.rate}", self.level]
        if self.iterative:
            parts.append("iter")
        if self.averaged:
            parts.append("avg")
        return "-".join(parts)

    @property
    def table1_id(self) -> int | None:
        for i, c in TABLE1.items():
            if c == self:
                return i
        return None

    def syncs_per_group(self) -> int:
        """Blocking communication points of one group per forward (independent of how many layers it holds)."""
        return 2 * (self.rate if self.iterative else 1)


def _table1() -> dict[int, ParallelConfig]:
    # Column order of the paper: rate (2 x8, 4 x8) > level (SL x4, L x4) > iterative (no, no, yes, yes) > averaged.
    out: dict[int, ParallelConfig] = {}
    i = 1
    for rate in (2, 4):
        for level in LEVELS:
            for iterative in (False, True):
                for averaged in (False, True):
                    out[i] = ParallelConfig(rate=rate, level=level, iterative=iterative, averaged=averaged)
                    i += 1
    return out


TABLE1: dict[int, ParallelConfig] = _table1()


def config_by_name(name: str | int) -> ParallelConfig:
    """A Table-1 configuration by paper ID (``7``, ``"7"``, ``"cfg7"``) or descriptive name (``"r2-layer-iter"``)."""
    key = str(name).strip().lower()
    if key.startswith("cfg"):
        key = key[3:]
    if key.isdigit():
        if int(key) not in TABLE1:
            raise ValueError(f"Table 1 has configurations 1..16, got {name!r}")
        return TABLE1[int(key)]
    key = key.replace("sublayer", "sub-layer").replace("-sl", "-sub-layer").replace("-l-", "-layer-")
    if key.endswith("-l"):
        key = key[:-2] + "-layer"
    for cfg in TABLE1.values():
        if cfg.name == key:
            return cfg
    names = ", ".join(c.name for c in TABLE1.values())
    raise ValueError(f"unknown parallel configuration {name!r}; use an ID 1..16 or one of: {names}")


def _run_attention(layer: DecoderLayer, x_bsh: torch.Tensor, cache: KVCache | None, slot: int) -> torch.Tensor:
    """Attention of ``layer`` on its own normed input, writing its K/V to cache ``slot`` (pre-reduction output)."""
    attn = layer.attn
    original = attn.cache_slot
    attn.cache_slot = slot  # a later pass of an iterative group sees new inputs: it needs its own K/V slot
    try:
        return attn(layer.attn_norm(x_bsh), cache)
    finally:
        attn.cache_slot = original


class ParallelGroup(nn.Module):
    """``rate`` decoder layers run from the same input (see module docstring); repeated when iterative."""

    def __init__(self, layers: list[DecoderLayer], cfg: ParallelConfig, slots: list[list[int]]):
        super().__init__()
        if len(layers) != cfg.rate:
            raise ValueError(f"a group of rate {cfg.rate} needs {cfg.rate} layers, got {len(layers)}")
        passes = cfg.rate if cfg.iterative else 1
        assert len(slots) == passes and all(len(p) == cfg.rate for p in slots)
        self.layers = nn.ModuleList(layers)
        self.cfg = cfg
        self.slots = slots  # slots[pass][member]

    def _aggregate(self, parts_rbsh: torch.Tensor) -> torch.Tensor:
        return parts_rbsh.mean(0) if self.cfg.averaged else parts_rbsh.sum(0)

    def _sub_layer_pass(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None, slots) -> torch.Tensor:
        attn_rbsh = torch.stack([_run_attention(ly, x_bsh, cache, sl) for ly, sl in zip(self.layers, slots)])
        # Partial (row-parallel) outputs of all members are summed locally first: one reduction for the group.
        x_bsh = x_bsh + comm.tp_reduce(self._aggregate(attn_rbsh))
        ffn_rbsh = torch.stack([ly.ffn(ly.ffn_norm(x_bsh)) for ly in self.layers])
        return x_bsh + comm.tp_reduce(self._aggregate(ffn_rbsh))

    def _layer_pass(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None, slots) -> torch.Tensor:
        # Each member's FFN needs its own *reduced* attention output, so the r attention outputs travel together
        # in one stacked reduction (one sync, r times the bytes), then the FFN deltas are summed and reduced once.
        attn_rbsh = comm.tp_reduce(
            torch.stack([_run_attention(ly, x_bsh, cache, sl) for ly, sl in zip(self.layers, slots)])
        )
        h_rbsh = x_bsh.unsqueeze(0) + attn_rbsh
        ffn_rbsh = torch.stack([ly.ffn(ly.ffn_norm(h_rbsh[i])) for i, ly in enumerate(self.layers)])
        # layer_i(x) - x = attn_i + ffn_i ; the FFN part is still a partial (pre-reduction) output.
        return x_bsh + self._aggregate(attn_rbsh) + comm.tp_reduce(self._aggregate(ffn_rbsh))

    def forward(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None = None) -> torch.Tensor:
        step = self._sub_layer_pass if self.cfg.level == "sub-layer" else self._layer_pass
        for slots in self.slots:
            x_bsh = step(x_bsh, comm, cache, slots)
        return x_bsh

    def extra_repr(self) -> str:
        return f"{self.cfg.name}, slots={self.slots}"


def _check_range(model: TransformerLM, start: int, end: int) -> None:
    n = len(model.stages)
    if not (0 <= start <= end <= n):
        raise ValueError(f"layer range [start={start}, end={end}) must satisfy 0 <= start <= end <= {n} (n layers)")
    for i in range(start, end):
        if type(model.stages[i]) is not DecoderLayer:
            raise ValueError(
                f"stage {i} is a {type(model.stages[i]).__name__}, not a plain DecoderLayer: only Llama-style layers "
                f"(arch='llama', not already parallelised) can be parallelised; choose a range of classic layers"
            )


def parallelise(
    model: TransformerLM, cfg: ParallelConfig, start: int = 0, end: int | None = None, inplace: bool = False
) -> TransformerLM:
    """A copy of ``model`` whose layers ``[start, end)`` run in parallel groups of ``cfg.rate`` (Table 1).

    ``end - start`` must be a multiple of the rate. ``rate=1`` or an empty range returns an unchanged model.
    """
    end = len(model.stages) if end is None else end
    _check_range(model, start, end)
    if (end - start) % cfg.rate:
        raise ValueError(
            f"layer range [{start}, {end}) holds {end - start} layers, not a multiple of rate={cfg.rate}; "
            f"choose end - start divisible by the rate"
        )
    out = model if inplace else copy.deepcopy(model)
    if cfg.rate == 1 or start == end:
        return out
    stages = list(out.stages)
    next_slot = out.n_cache_slots
    groups = []
    for g0 in range(start, end, cfg.rate):
        members = stages[g0 : g0 + cfg.rate]
        slots = [[m.attn.cache_slot for m in members]]
        for _ in range(1, cfg.rate if cfg.iterative else 1):
            slots.append(list(range(next_slot, next_slot + cfg.rate)))
            next_slot += cfg.rate
        groups.append(ParallelGroup(members, cfg, slots))
    out.stages = nn.ModuleList(stages[:start] + groups + stages[end:])
    out.n_cache_slots = next_slot
    out.posthoc = {"kind": "parallel", "config": cfg.name, "table1_id": cfg.table1_id, "start": start, "end": end}
    return out


def expected_syncs_per_token(n_layers: int, cfg: ParallelConfig, start: int, end: int) -> int:
    """Blocking syncs per forward of a 2-way tensor-parallel run: a plain layer's 2 + 2 per group pass."""
    n_groups = (end - start) // cfg.rate if cfg.rate > 1 else 0
    plain = n_layers - n_groups * cfg.rate
    return (DecoderLayer.sync_plan() * plain).blocking + n_groups * cfg.syncs_per_group()


def effective_depth(n_layers: int, cfg: ParallelConfig, start: int, end: int) -> int:
    """Sequential layer steps on the critical path (a group pass counts as one)."""
    if cfg.rate == 1:
        return n_layers
    n_groups = (end - start) // cfg.rate
    return n_layers - n_groups * cfg.rate + n_groups * (cfg.rate if cfg.iterative else 1)


__all__ = [
    "LEVELS",
    "TABLE1",
    "ParallelConfig",
    "ParallelGroup",
    "config_by_name",
    "effective_depth",
    "expected_syncs_per_token",
    "parallelise",
]
