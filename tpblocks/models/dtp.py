"""Delayed Tensor Parallelism (DTP): Kog's Laneformer as a stage of the model family (``arch="dtp"``).

Shape legend: l lanes held here (L in total), b batch, s sequence, h model width, V vocabulary.

The embedding is copied into L lanes and **each lane keeps its own full-width residual stream** (l, b, s, h).
Lane l holds a Megatron shard of every layer: query heads [l n/L, (l+1) n/L), KV heads [l k/L, (l+1) k/L) (GQA
groups stay inside a lane) and FFN columns [l F/L, (l+1) F/L); its attention ``wo`` and FFN down-projection
map that share back to a full-width *partial* output p_l. After each sub-layer (attention, then FFN) layer i
combines the partial outputs by its rule (``ModelConfig.dtp_rules``):

  present    x_l += sum_j p_j(i)                                   an all-reduce now (blocking)
  past       x_l += p_l(i) + sum_{j != l} p_j(i - δ)               the sum of layer i - δ, started δ layers ago
  no_reduce  x_l += sqrt(L) p_l(i)                                 no communication

Layers below δ = ``broadcast_delay`` are *present* (``use_early_comm``) or *no_reduce*; from δ on *past*. A
*past* layer's delayed sum is the same sub-layer type's, so attention hears attention and FFN hears FFN.
``early_comm_resend``: a *present* layer's sum is also received δ layers later (the older code's behaviour:
its cross-lane terms then arrive twice); that reuses the sum already computed, so it costs no collective.

With every layer *present* all lanes stay equal and the model is the dense Llama whose weights are the lanes'
shards concatenated (lane-major heads). With ``use_comm=False`` the lanes are L independent models until
the head. The head (``lane_head_logits``) aggregates the lanes: one blocking sync.

Every communication point is a communicator call: ``lane_sum_now`` (present), ``lane_sum_start`` (past),
``lane_reduce`` / ``vocab_gather`` (head). In one process they are local sums; one lane per rank after
``tpblocks.parallel.shard_model``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .comm import Communicator, PendingSum, SyncPlan
from .config import ModelConfig
from .kv_cache import KVCache
from .lanes import LaneLayer, lane_matmul, lane_scale
from .layers import RMSNorm, RotaryEmbedding, local, rms_norm

SUBLAYERS = ("attention", "ffn")


class DTPStack(nn.Module):
    """The n_layers layers of a DTP model, lanes stacked on a leading tensor axis (one bmm per sub-layer)."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, lanes: int | None = None, lane_offset: int = 0):
        super().__init__()
        L = cfg.lane_count
        lanes = L if lanes is None else lanes
        self.lane_count = L
        self.lane_offset = lane_offset
        self.layers = nn.ModuleList(
            LaneLayer(
                lanes,
                cfg.hidden_size,
                cfg.n_heads // L,
                cfg.n_kv_heads // L,
                cfg.ffn_hidden // L,
                cfg.hidden_size,
                cfg.norm_eps,
                rope,
                lane_offset,
                head_dim=cfg.head_dim,
                shared_norms=cfg.replicated_rmsn_scale,
            )  # fmt: skip
            for _ in range(cfg.n_layers)
        )
        self.rules = cfg.dtp_rules
        self.sends = cfg.dtp_sends
        self.delay = cfg.broadcast_delay
        self.no_reduce_scale = math.sqrt(L)

    @property
    def lanes(self) -> int:
        return self.layers[0].lanes

    @staticmethod
    def sync_plan(cfg: ModelConfig) -> SyncPlan:
        """2 blocking per *present* layer; 2 overlapped per sending layer that is not *present* (a resent
        *present* sum is reused, not communicated again). The lane head adds its one sync (``lane_head_logits``)."""
        present = cfg.dtp_rules.count("present")
        started = sum(send and rule != "present" for send, rule in zip(cfg.dtp_sends, cfg.dtp_rules))
        return SyncPlan(blocking=2 * present, overlapped=2 * started)

    def forward(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None = None) -> torch.Tensor:
        """(b, s, h) -> the lanes' residual streams (l, b, s, h); the head aggregates them."""
        x_lbsh = x_bsh.unsqueeze(0).expand(self.lanes, *x_bsh.shape)
        in_flight: dict[tuple[int, str], tuple[PendingSum, torch.Tensor]] = {}  # (layer, sub-layer) -> (sum, sent)
        for i, layer in enumerate(self.layers):
            for kind in SUBLAYERS:
                partial = layer.attention(x_lbsh, cache) if kind == "attention" else layer.feed_forward(x_lbsh)
                x_lbsh, total = self._combine(x_lbsh, partial, i, kind, comm, in_flight)
                if self.sends[i]:
                    sum_i = PendingSum(total) if total is not None else comm.lane_sum_start(partial)
                    in_flight[(i + self.delay, kind)] = (sum_i, partial)
        assert not in_flight, "dtp_sends only sends to layers that exist"
        return x_lbsh

    def _combine(
        self, x_lbsh: torch.Tensor, partial: torch.Tensor, i: int, kind: str, comm: Communicator, in_flight: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's rule applied to one sub-layer; also returns the lane sum when the rule computed it."""
        rule = self.rules[i]
        if rule == "present":
            total = comm.lane_sum_now(partial)
            return x_lbsh + total.unsqueeze(0), total
        if rule == "no_reduce":
            return x_lbsh + self.no_reduce_scale * partial, None
        x_lbsh = x_lbsh + partial
        if (i, kind) in in_flight:  # the other lanes' outputs of layer i - δ: total minus what this lane sent
            pending, sent = in_flight.pop((i, kind))
            x_lbsh = x_lbsh + (pending.wait().unsqueeze(0) - sent)
        return x_lbsh, None


def final_norm(cfg: ModelConfig) -> RMSNorm:
    """The final norm: one weight (h,) shared by the lanes, or one per lane (L, h)."""
    per_lane = cfg.arch == "dtp" and not cfg.replicated_rmsn_scale
    return RMSNorm((cfg.lane_count, cfg.hidden_size) if per_lane else cfg.hidden_size, cfg.norm_eps)


def lane_head_logits(
    x_lbsh: torch.Tensor, norm: RMSNorm, output: nn.Linear, comm: Communicator, cfg: ModelConfig
) -> torch.Tensor:
    """Logits from the lanes' streams (l, b, s, h), by ``cfg.lm_head_type``; one blocking sync.

    replicate       mean over lanes of norm(x_l), then Linear(h, V); ``pre_norm_lane_agg``: norm(sum_l x_l)
    lane            Linear(L h, V) on the concatenated normed lanes = sum over lanes of each lane's column block
    vocab_parallel  lane l's normed stream times vocabulary rows [l V/L, (l+1) V/L): this process's lanes'
                    logit slices (b, s, l V/L); the model gathers them (``comm.vocab_gather``)
    """
    l, b, s, h = x_lbsh.shape
    if cfg.pre_norm_lane_agg:
        return output(norm(comm.lane_reduce(x_lbsh.sum(0))))
    xn_lbsh = rms_norm(x_lbsh, lane_scale(local(norm.weight)), norm.eps)
    if cfg.lm_head_type == "replicate":
        return output(comm.lane_reduce(xn_lbsh.sum(0)) / cfg.lane_count)
    if cfg.lm_head_type == "lane":
        w_lhv = local(output.weight).view(-1, l, h).permute(1, 2, 0)  # (V, l h) -> (l, h, V): lane j's column block
        return comm.lane_reduce(lane_matmul(xn_lbsh, w_lhv).sum(0))
    w_lhc = local(output.weight).view(l, -1, h).transpose(1, 2)  # (l V/L, h) -> (l, h, V/L): lane j's vocabulary rows
    logits_lbsc = lane_matmul(xn_lbsh, w_lhc)
    return logits_lbsc.permute(1, 2, 0, 3).reshape(b, s, -1)
