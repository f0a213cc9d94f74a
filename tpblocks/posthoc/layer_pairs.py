"""Layer Parallelism (LP): contiguous layer pairs of a trained model computed from the same input.

For every pair (i, i+1) in ``[start, end)``:  x <- x + (layer_i(x) - x) + (layer_{i+1}(x) - x).
Each layer keeps its own norms, attention and FFN; nothing is averaged (the LP recipe sums the two residual
updates). Depth drops by one per pair.

Placement: the two layers of a pair run on different ranks of the tensor-parallel group (layer ``j`` of the pair
on rank ``j % tp_world``); each rank adds its own layer's residual update and **one** all-reduce per pair
(``comm.tp_reduce``, so it is counted by the ``Communicator``) sums them. In one process (``tp_world == 1``)
the same code computes both layers and the reduction is the identity, but it is still counted: that is the
sync a 2-rank run makes. The KV cache stays at the layers' original slot indices.

``distribute_layer_pairs`` makes the 2-rank placement: tensor parallelism (``tpblocks.parallel.shard_model``)
outside the pairs, each pair member whole on its own rank (the other member's weights are dropped).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from tpblocks.models.comm import Communicator, LocalComm
from tpblocks.models.kv_cache import KVCache
from tpblocks.models.layers import DecoderLayer
from tpblocks.models.model import TransformerLM


@dataclass(frozen=True, kw_only=True)
class LayerPairConfig:
    """Layers ``[start, end)`` are merged into ``(end - start) / 2`` parallel pairs."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"LP range [start={self.start}, end={self.end}) must have 0 <= start <= end")
        if (self.end - self.start) % 2:
            raise ValueError(
                f"LP range [start={self.start}, end={self.end}) holds an odd number of layers; "
                f"pairs need an even count (e.g. end={self.end - 1} or end={self.end + 1})"
            )

    @property
    def n_pairs(self) -> int:
        return (self.end - self.start) // 2

    @property
    def name(self) -> str:
        return f"LP[{self.start},{self.end})" if self.n_pairs else "LP(none)"


class LayerPair(nn.Module):
    """Two decoder layers on the same input; their residual updates are summed by one ``tp_reduce``."""

    def __init__(self, first: DecoderLayer, second: DecoderLayer):
        super().__init__()
        self.members = nn.ModuleList([first, second])
        self.owned = [0, 1]  # member indices computed by this process (distribute_layer_pairs narrows it)
        # The members' own two tensor-parallel reductions must stay local: a member is whole on its rank.
        self._local = LocalComm()

    def forward(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None = None) -> torch.Tensor:
        delta_bsh = torch.zeros_like(x_bsh)
        for j in self.owned:
            if j % comm.tp_world == comm.tp_rank:
                delta_bsh = delta_bsh + (self.members[j](x_bsh, self._local, cache) - x_bsh)
        return x_bsh + comm.tp_reduce(delta_bsh)  # the pair's single sync

    def extra_repr(self) -> str:
        return f"owned={self.owned}"


def apply_layer_pairs(model: TransformerLM, cfg: LayerPairConfig, inplace: bool = False) -> TransformerLM:
    """A copy of ``model`` with layers ``[cfg.start, cfg.end)`` merged into parallel pairs."""
    n = len(model.stages)
    if cfg.end > n:
        raise ValueError(f"LP range end={cfg.end} exceeds the model's {n} layers")
    for i in range(cfg.start, cfg.end):
        if type(model.stages[i]) is not DecoderLayer:
            raise ValueError(
                f"stage {i} is a {type(model.stages[i]).__name__}, not a plain DecoderLayer; "
                f"Layer Parallelism applies to Llama-style layers (arch='llama') not already transformed"
            )
    out = model if inplace else copy.deepcopy(model)
    if cfg.n_pairs == 0:
        return out
    stages = list(out.stages)
    pairs = [LayerPair(stages[i], stages[i + 1]) for i in range(cfg.start, cfg.end, 2)]
    out.stages = nn.ModuleList(stages[: cfg.start] + pairs + stages[cfg.end :])
    out.posthoc = {"kind": "layer_pairs", "config": cfg.name, "start": cfg.start, "end": cfg.end}
    return out


def expected_lp_syncs_per_token(n_layers: int, cfg: LayerPairConfig) -> int:
    """Blocking syncs per forward with tensor parallelism outside the pairs: a plain layer's 2 + 1 per pair."""
    return (DecoderLayer.sync_plan() * (n_layers - 2 * cfg.n_pairs)).blocking + cfg.n_pairs


# ---------------------------------------------------------------------------------------------- 2-rank placement
def distribute_layer_pairs(model: TransformerLM, cfg: LayerPairConfig, comm: Communicator) -> TransformerLM:
    """A 2-rank placement of ``model`` (a full, plain Llama; every rank holds the same weights) with LP on ``cfg``.

    Layers outside the pairs get Megatron tensor parallelism (``tpblocks.parallel.shard_model``, 2 syncs per
    layer), as in the LP paper; pair member ``j`` lives whole on rank ``j % 2`` and the other member's weights
    are not kept. One all-reduce per pair (``comm.tp_reduce``) is the only other communication.
    """
    from tpblocks.parallel import shard_model  # torch.distributed lives there, never in tpblocks.models

    if comm.tp_world != 2:
        raise ValueError(f"Layer Parallelism places a pair on 2 ranks; got tp_world={comm.tp_world}")
    full = apply_layer_pairs(model, cfg)  # validates the range, copies the full pair layers
    pairs = [s for s in full.stages if isinstance(s, LayerPair)]
    for pair in pairs:
        pair.owned = [j for j in (0, 1) if j % comm.tp_world == comm.tp_rank]
        for j in (0, 1):
            if j not in pair.owned:
                pair.members[j] = nn.Identity()  # never run on this rank: free its weights
    out = shard_model(copy.deepcopy(model), comm)
    stages = list(out.stages)
    out.stages = nn.ModuleList(stages[: cfg.start] + pairs + stages[cfg.end :])
    # Keep the shard records of the layers still sharded, renumbered to their new stage index.
    spec = {}
    for name, value in out.shard_spec.items():
        parts = name.split(".")
        if parts[0] == "stages":
            i = int(parts[1])
            if cfg.start <= i < cfg.end:
                continue
            if i >= cfg.end:
                parts[1] = str(i - cfg.n_pairs)
        spec[".".join(parts)] = value
    out.shard_spec = spec
    out.posthoc = full.posthoc
    return out


__all__ = [
    "LayerPair",
    "LayerPairConfig",
    "apply_layer_pairs",
    "distribute_layer_pairs",
    "expected_lp_syncs_per_token",
]
