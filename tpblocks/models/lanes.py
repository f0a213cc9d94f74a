"""Lane layers: the decoder layers of all lanes of one TP block at one depth, as stacked weights.

Shape legend: l lanes held by this process, b batch, s sequence, d lane width, n/k query/KV heads,
e head dim, f lane FFN size, c lane output slice (h/L for Burger, d for Sandwich).

Lanes are a tensor axis: every weight carries a leading lane dimension and each sub-layer of all lanes is
one ``torch.bmm``. There is no Python loop over lanes in ``forward``, so 8 lanes on one CPU and 1 lane per
GPU run the same code; only the size of the lane axis (and ``lane_offset``) changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch as kernel_dispatch

from .kv_cache import KVCache
from .layers import DecoderLayer, RotaryEmbedding, attend, local, rms_norm


def _stacked(l: int, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(l, *shape))


def lane_scale(weight: torch.Tensor) -> torch.Tensor:
    """An RMSNorm weight broadcast over (l, b, s, d): per lane (l, d), or shared by every lane (d,)."""
    return weight[:, None, None, :] if weight.dim() == 2 else weight


def lane_matmul(x_lbsd: torch.Tensor, w_ldk: torch.Tensor) -> torch.Tensor:
    """(l, b, s, d) @ (l, d, k) -> (l, b, s, k) as one batched matmul."""
    l, b, s, d = x_lbsd.shape
    return torch.bmm(x_lbsd.reshape(l, b * s, d), w_ldk).view(l, b, s, -1)


def add_into_own_slice(x_lbsd: torch.Tensor, out_lbsc: torch.Tensor, lane_offset: int) -> torch.Tensor:
    """Burger residual write: lane i adds its FFN output only into feature slice (lane_offset + i).

    The slice of lane i's own index lies on a diagonal of the (lane, slice) grid, so a strided view adds
    all lanes at once. The other features are carried unchanged from before the FFN (report Table 3).
    """
    l, b, s, d = x_lbsd.shape
    c = out_lbsc.shape[-1]
    y = x_lbsd.clone()
    own_bscl = torch.diagonal(y.view(l, b, s, d // c, c), offset=lane_offset, dim1=0, dim2=3)
    own_bscl.add_(out_lbsc.permute(1, 2, 3, 0))
    return y


def own_slices(x_lbsd: torch.Tensor, lane_offset: int, slice_size: int) -> torch.Tensor:
    """Burger 'sample': slice (lane_offset + i) of lane i for every local lane, concatenated -> (b, s, l*c)."""
    l, b, s, d = x_lbsd.shape
    own_bscl = torch.diagonal(x_lbsd.view(l, b, s, d // slice_size, slice_size), offset=lane_offset, dim1=0, dim2=3)
    return own_bscl.permute(0, 1, 3, 2).reshape(b, s, l * slice_size)


class LaneLayer(nn.Module):
    """One pre-norm decoder layer for each of ``l`` lanes, weights stacked on a leading lane axis."""

    def __init__(
        self,
        lanes: int,
        width: int,
        n_heads: int,
        n_kv_heads: int,
        ffn_hidden: int,
        out_size: int,
        eps: float,
        rope: RotaryEmbedding,
        lane_offset: int = 0,
        head_dim: int | None = None,
        shared_norms: bool = False,
    ):
        """``head_dim`` defaults to width / n_heads (a lane holding all its heads); a Megatron-style lane (DTP)
        holds n_heads of a wider model's heads. ``shared_norms``: one RMSNorm weight (width,) for every lane
        instead of one per lane (l, width); placement keeps 1-D parameters whole (they are not lane-stacked)."""
        super().__init__()
        self.head_dim = head_dim or width // n_heads
        self.eps = eps
        self.rope = rope
        self.lane_offset = lane_offset  # global index of this module's first lane
        # Lanes held here (placement sets it when it cuts them): not read off a weight's shape, which is the global
        # one for a DTensor lane shard and a dp shard's under FSDP2.
        self.n_lanes = lanes
        self.burger_write = out_size != width
        e = self.head_dim
        norm_shape = (width,) if shared_norms else (lanes, width)
        self.attn_norm = nn.Parameter(torch.ones(norm_shape))
        self.wq = _stacked(lanes, width, n_heads * e)
        self.wk = _stacked(lanes, width, n_kv_heads * e)
        self.wv = _stacked(lanes, width, n_kv_heads * e)
        self.wo = _stacked(lanes, n_heads * e, width)
        self.ffn_norm = nn.Parameter(torch.ones(norm_shape))
        self.w_gate = _stacked(lanes, width, ffn_hidden)
        self.w_up = _stacked(lanes, width, ffn_hidden)
        self.w_down = _stacked(lanes, ffn_hidden, out_size)
        self.cache_slot = -1
        self.window: int | None = None  # sliding-window attention (set by the model)

    @property
    def lanes(self) -> int:
        return self.n_lanes

    def kv_cache_shape(self, batch: int) -> tuple[int, int, int]:
        """(lanes x batch, KV heads, head dim): lanes fold into the batch axis of the cache, as in ``attention``."""
        return self.lanes * batch, self.wk.shape[2] // self.head_dim, self.head_dim

    def forward(self, x_lbsd: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x_lbsd = x_lbsd + self.attention(x_lbsd, cache)
        if self.burger_write and kernel_dispatch.use_triton(x_lbsd):
            from kernels import ops  # Triton: down-projection of all lanes straight into their own slices

            return ops.lane_down_into_own_slice(
                x_lbsd, self.ffn_activation(x_lbsd), local(self.w_down), self.lane_offset
            )
        ffn_out = self.feed_forward(x_lbsd)
        if self.burger_write:
            return add_into_own_slice(x_lbsd, ffn_out, self.lane_offset)
        return x_lbsd + ffn_out

    def attention(self, x_lbsd: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        l, b, s, _ = x_lbsd.shape
        e = self.head_dim
        start = cache.position if cache is not None else 0
        xn = rms_norm(x_lbsd, lane_scale(local(self.attn_norm)), self.eps)
        # Lanes fold into the batch axis for attention: (l*b, heads, s, e).
        q = lane_matmul(xn, local(self.wq)).view(l * b, s, -1, e).transpose(1, 2)
        k = lane_matmul(xn, local(self.wk)).view(l * b, s, -1, e).transpose(1, 2)
        v = lane_matmul(xn, local(self.wv)).view(l * b, s, -1, e).transpose(1, 2)
        q, k = self.rope(q, start), self.rope(k, start)
        o = attend(q, k, v, cache, self.cache_slot, self.window)  # (l*b, n, s, e)
        o_lbsf = o.transpose(1, 2).reshape(l, b, s, -1)
        return lane_matmul(o_lbsf, local(self.wo))

    def feed_forward(self, x_lbsd: torch.Tensor) -> torch.Tensor:
        return lane_matmul(self.ffn_activation(x_lbsd), local(self.w_down))

    def ffn_activation(self, x_lbsd: torch.Tensor) -> torch.Tensor:
        """silu(xn W_gate) * (xn W_up) of the normed input, (l, b, s, f)."""
        xn = rms_norm(x_lbsd, lane_scale(local(self.ffn_norm)), self.eps)
        g_lbsf, u_lbsf = lane_matmul(xn, local(self.w_gate)), lane_matmul(xn, local(self.w_up))
        if kernel_dispatch.use_triton(g_lbsf):
            from kernels import ops  # fused Triton SwiGLU (kernels/swiglu.py)

            return ops.swiglu(g_lbsf, u_lbsf)
        return F.silu(g_lbsf) * u_lbsf

    @torch.no_grad()
    def load_dense_(self, lane: int, layer: DecoderLayer) -> None:
        """Copy a classic ``DecoderLayer``'s weights into local lane ``lane`` (nn.Linear stores (out, in))."""
        if self.burger_write:
            raise ValueError("a Burger lane has a truncated down-projection; it cannot hold a dense layer")
        self.attn_norm[lane].copy_(layer.attn_norm.weight)
        self.ffn_norm[lane].copy_(layer.ffn_norm.weight)
        for mine, theirs in (
            (self.wq, layer.attn.wq),
            (self.wk, layer.attn.wk),
            (self.wv, layer.attn.wv),
            (self.wo, layer.attn.wo),
            (self.w_gate, layer.ffn.w_gate),
            (self.w_up, layer.ffn.w_up),
            (self.w_down, layer.ffn.w_down),
        ):
            mine[lane].copy_(theirs.weight.T)
