"""Tensor Parallel Block (report §4.1, Algorithm 1): prepare -> lanes of lane layers -> merge.

Shape legend: b batch, s sequence, h model width, l lanes held here (of L in total), d lane width,
c = h/L features each lane contributes to the merged state.

Gateways (Table 3):
  Sandwich  prepare = split h into L slices of d = h/L;      merge = concatenate the lanes
  Burger    prepare = copy h to every lane (d = h);          merge = slice l of lane l, concatenated
  Track     prepare = copy (d = h);                            merge = x + sum over lanes of (lane_l - x)
            (Parallel Track: G tracks of lane_depth layers each, synchronised once per block)
One blocking communication point per block: the merge (``comm.lane_gather``, or ``comm.lane_reduce`` for
Track). Delayed communication adds non-blocking ones (``comm.lane_sum_start`` ... ``wait``), see ``delayed.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from .comm import Communicator, SyncPlan
from .config import ModelConfig
from .delayed import Reception
from .kv_cache import KVCache
from .lanes import LaneLayer, own_slices
from .layers import RotaryEmbedding


class TPBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, lanes: int | None = None, lane_offset: int = 0):
        super().__init__()
        lanes = cfg.lane_count if lanes is None else lanes
        if lane_offset < 0 or lane_offset + lanes > cfg.lane_count:
            raise ValueError(f"lanes [{lane_offset}, {lane_offset + lanes}) are outside 0..{cfg.lane_count}")
        self.recipe = cfg.recipe
        self.lane_count = cfg.lane_count
        self.lane_offset = lane_offset
        self.slice_size = cfg.lane_slice
        self.layers = nn.ModuleList(
            LaneLayer(
                lanes,
                cfg.lane_hidden_size,
                cfg.lane_heads,
                cfg.lane_kv_heads,
                cfg.lane_ffn_hidden,
                cfg.lane_out_size,
                cfg.norm_eps,
                rope,
                lane_offset,
            )
            for _ in range(cfg.lane_depth)
        )
        self.sends = cfg.delayed_sends
        self.comm_length = cfg.comm_length
        self.reception = (
            Reception(cfg.comm_reception, lanes, cfg.lane_hidden_size, len(self.sends), cfg.lane_count, cfg.norm_eps)
            if self.sends
            else None
        )

    @property
    def lanes(self) -> int:
        return self.layers[0].lanes

    # ------------------------------------------------------------------ gateways
    def prepare(self, x_bsh: torch.Tensor) -> torch.Tensor:
        b, s, h = x_bsh.shape
        if self.recipe in ("burger", "track"):
            return x_bsh.unsqueeze(0).expand(self.lanes, b, s, h)
        x_bsLd = x_bsh.view(b, s, self.lane_count, h // self.lane_count)
        return x_bsLd[:, :, self.lane_offset : self.lane_offset + self.lanes].permute(2, 0, 1, 3)

    def merge_local(self, x_lbsd: torch.Tensor) -> torch.Tensor:
        """This process's part of the merged state: (b, s, l*c), lanes in global order."""
        if self.recipe == "burger":
            return own_slices(x_lbsd, self.lane_offset, self.slice_size)
        l, b, s, d = x_lbsd.shape
        return x_lbsd.permute(1, 2, 0, 3).reshape(b, s, l * d)

    @staticmethod
    def sync_plan(cfg: ModelConfig) -> SyncPlan:
        """The merge (Track: the reduce) of one block, and its delayed sends (Eq. 10-11)."""
        return SyncPlan(blocking=1, overlapped=len(cfg.delayed_sends))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x_bsh: torch.Tensor,
        comm: Communicator,
        cache: KVCache | None = None,
        lane_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``lane_states``, when given, receives every lane state after each layer (for analysis and tests)."""
        x_lbsd = self.prepare(x_bsh)
        in_flight: dict[int, tuple] = {}  # reception depth -> (handle, what this process sent, point index)
        for depth, layer in enumerate(self.layers):
            x_lbsd = layer(x_lbsd, cache)
            if depth in in_flight:
                handle, sent, point = in_flight.pop(depth)
                x_lbsd = self.reception(x_lbsd, handle.wait(), sent, point)
            if depth in self.sends:
                in_flight[depth + self.comm_length] = (comm.lane_sum_start(x_lbsd), x_lbsd, self.sends.index(depth))
            if lane_states is not None:
                lane_states.append(x_lbsd)
        assert not in_flight, "config validation guarantees every send is received inside the lane"
        if self.recipe == "track":  # x + sum_l (lane_l - x): partial sums over this process's lanes, then reduce
            local_update = x_lbsd.sum(0) - x_lbsd.shape[0] * x_bsh
            return x_bsh + comm.lane_reduce(local_update)  # the block's one blocking sync
        return comm.lane_gather(self.merge_local(x_lbsd))  # the block's one blocking sync
