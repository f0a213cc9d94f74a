"""Other ways of cutting tensor-parallel synchronisation, as stages of the same model family.

Shape legend: b batch, s sequence, h model width, l lanes held here (G in total), d = h lane width.

Each schedule below is the same sub-layers (attention, SwiGLU FFN, RMSNorm) arranged around different
communication points, so they share placement, counting and the decode benchmark with Llama-TP and TP blocks:

  schedule                 stage              syncs per token (blocking + overlapped)
  Llama-TP                 DecoderLayer       2 per layer, blocking
  PaLM / GPT-J parallel    ParallelLayer      1 per layer, blocking (attention and FFN read the same input)
  Ladder residual          LadderStack        2 per layer, each awaited one sub-layer later (overlapped)
  Kraken                   KrakenBlock        1 per layer overlapped with attention, + 1 blocking gather at the end
  Parallel Track           TPBlock "track"    1 per block of D layers (tp_block_repetition blocks), blocking
  no-communication         comm.enabled=False 0 (un-synchronised ranks: an upper bound, not a model)
"""

from __future__ import annotations

import torch
from torch import nn

from .comm import Communicator, SyncPlan
from .config import ModelConfig
from .kv_cache import KVCache
from .lanes import LaneLayer
from .layers import Attention, FeedForward, Linear, RMSNorm, RotaryEmbedding


class ParallelLayer(nn.Module):
    """PaLM / GPT-J block: x + (attn(norm(x)) + ffn(norm(x))), one row-parallel sum for both branches."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        h = cfg.hidden_size
        self.attn_norm = RMSNorm(h, cfg.norm_eps)  # the one norm both branches read
        self.attn = Attention(h, cfg.n_heads, cfg.n_kv_heads, rope)
        self.ffn = FeedForward(h, cfg.ffn_hidden)

    @staticmethod
    def sync_plan(cfg: ModelConfig) -> SyncPlan:
        return SyncPlan(blocking=1)

    def forward(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None = None) -> torch.Tensor:
        xn = self.attn_norm(x_bsh)
        return x_bsh + comm.tp_reduce(self.attn(xn, cache) + self.ffn(xn))  # the layer's one sync


class LadderStack(nn.Module):
    """Ladder residual (Zhang et al., ICML 2025) over a stack of classic layers.

    Sub-layers k = 1..2L alternate attention and FFN. Sub-layer k reads the residual *before* sub-layer
    k-1's output is added, so k-1's all-reduce runs while k computes:
        h_k = h_{k-1} + o_{k-1},   o_k = allreduce(f_k(norm_k(h_{k-1})))   (started, awaited one sub-layer later)
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def sync_plan(cfg: ModelConfig) -> SyncPlan:
        return SyncPlan(overlapped=2 * cfg.n_layers)  # every sub-layer's sum, awaited one sub-layer later

    def forward(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None = None) -> torch.Tensor:
        in_flight = None
        for layer in self.layers:
            for norm, branch in ((layer.attn_norm, layer.attn), (layer.ffn_norm, layer.ffn)):
                out = branch(norm(x_bsh), cache) if branch is layer.attn else branch(norm(x_bsh))
                started = comm.tp_reduce_start(out)
                if in_flight is not None:
                    x_bsh = x_bsh + in_flight.wait()
                in_flight = started
        return x_bsh + in_flight.wait()


class KrakenBlock(nn.Module):
    """Kraken (Prabhakar et al., NeurIPS 2024): G full-width lanes with a share of the heads and a narrower FFN.

    At layer l > 0 the sum of the *other* lanes' layer-(l-1) outputs enters only the FFN input of each lane,
    so the all-reduce started after layer l-1 overlaps layer l's attention. At the end the lanes are
    concatenated (one blocking gather) and projected back to h.
    """

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, lanes: int | None = None, lane_offset: int = 0):
        super().__init__()
        lanes = cfg.lane_count if lanes is None else lanes
        h = cfg.hidden_size
        self.lane_count = cfg.lane_count
        self.lane_offset = lane_offset
        self.layers = nn.ModuleList(
            LaneLayer(
                lanes, h, cfg.lane_heads, cfg.lane_kv_heads, cfg.lane_ffn_hidden, h, cfg.norm_eps, rope, lane_offset
            )  # fmt: skip
            for _ in range(cfg.n_layers)
        )
        self.proj = Linear(cfg.lane_count * h, h, bias=False)

    @staticmethod
    def sync_plan(cfg: ModelConfig) -> SyncPlan:
        return SyncPlan(blocking=1, overlapped=cfg.n_layers - 1)  # the final gather; layer l-1's lane sum

    def forward(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None = None) -> torch.Tensor:
        b, s, h = x_bsh.shape
        x_lbsd = x_bsh.unsqueeze(0).expand(self.layers[0].lanes, b, s, h)
        in_flight = None  # (handle of the sum of all lanes' previous outputs, what this process sent)
        for depth, layer in enumerate(self.layers):
            a_lbsd = x_lbsd + layer.attention(x_lbsd, cache)  # overlaps the all-reduce started below
            ffn_in = a_lbsd
            if in_flight is not None:
                handle, sent = in_flight
                ffn_in = a_lbsd + (handle.wait().unsqueeze(0) - sent)
            x_lbsd = a_lbsd + layer.feed_forward(ffn_in)
            last = depth == len(self.layers) - 1
            in_flight = None if last else (comm.lane_sum_start(x_lbsd), x_lbsd)
        l = x_lbsd.shape[0]
        merged = comm.lane_gather(x_lbsd.permute(1, 2, 0, 3).reshape(b, s, l * h))  # the one blocking sync
        return self.proj(merged)
