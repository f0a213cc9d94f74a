"""Delayed communication between lanes (report §4.2) and how a lane takes in what it receives.

A lane broadcasts its hidden state after layer d and, ``comm_length`` layers later, adds what the other
lanes sent. Because the sum is only needed ``comm_length`` layers after it is started, the all-reduce runs
in the background of those layers (a non-blocking communication point).

Reception modes (``ModelConfig.comm_reception``):
  "sum"    x_i + sum_{j != i} x_j                        the report's faithful rule. Fig. 22a: losses blew up.
           With L lanes the received term is (L-1) times the size of the lane's own state, at every send.
  "mean"   x_i + mean_{j != i} x_j                       bounded magnitude, no parameters.
  "gated"  x_i + g_i * RMSNorm(mean_{j != i} x_j)        default. g_i (one vector per lane and send point) is
           zero-initialised: training starts from the lane-isolated model, and the normalisation keeps the
           received term at unit scale whatever L and depth are. This is the "change the initialization and
           reception" the report's §6.7 asks for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch as kernel_dispatch

from .layers import local


class Reception(nn.Module):
    """Adds the other lanes' broadcast to each lane, for every receive point of one TP block."""

    def __init__(self, mode: str, lanes: int, width: int, n_points: int, lane_count: int, eps: float):
        super().__init__()
        self.mode = mode
        self.lane_count = lane_count
        self.eps = eps
        if mode == "gated":
            self.gate = nn.Parameter(torch.zeros(n_points, lanes, width))
        else:
            self.register_parameter("gate", None)

    def forward(
        self, x_lbsd: torch.Tensor, total_bsd: torch.Tensor, sent_lbsd: torch.Tensor, point: int
    ) -> torch.Tensor:
        if kernel_dispatch.use_triton(x_lbsd):  # one-pass Triton reception (kernels/reception.py)
            from kernels import ops

            gate = local(self.gate)[point] if self.gate is not None else None
            return ops.reception(x_lbsd, total_bsd, sent_lbsd, gate, self.mode, self.lane_count, self.eps)
        others = total_bsd.unsqueeze(0) - sent_lbsd  # sum over lanes j != i, for each local lane i
        if self.mode == "sum":
            return x_lbsd + others
        others = others / (self.lane_count - 1)
        if self.mode == "mean":
            return x_lbsd + others
        # The gate is the only scale, so normalise without a weight (fp32, as rms_norm does).
        normed = F.rms_norm(others.float(), (others.shape[-1],), eps=self.eps).to(others.dtype)
        return x_lbsd + local(self.gate)[point][:, None, None, :] * normed
