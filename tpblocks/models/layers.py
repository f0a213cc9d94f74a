"""Building blocks of a Llama decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, the classic layer.

Shape legend: b batch, s sequence (new tokens), t total positions in the KV cache, h hidden, n heads,
k KV heads, e head dim, f FFN intermediate size.

A classic layer is the dense decoder layer of the Llama baseline and of block mixing (report §4.3). Its
two row-parallel outputs (attention ``wo`` and FFN ``w_down``) go through ``comm.tp_reduce``: identity in
one process, an all-reduce when ``tpblocks.parallel`` shards the layer Megatron-style.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch as kernel_dispatch

from .comm import Communicator, SyncPlan
from .kv_cache import KVCache, causal_mask


def local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight: ``weight.to_local()`` when it is a DTensor (training's lane shards,
    ``tpblocks.parallel.shard_model(lane_dtensors=True)``), else ``weight`` itself. The model computes on plain local
    tensors and never imports torch.distributed (duck typing); torchtitan's MoE ``GroupedExperts.forward`` reads its
    stacked expert weights the same way (``self.w1.to_local()``). Autograd flows through ``to_local``: the gradient
    lands on the DTensor parameter with its placements."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


class Linear(nn.Linear):
    """``nn.Linear`` that reads its weight through ``local`` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, local(self.weight), None if self.bias is None else local(self.bias))


class Embedding(nn.Embedding):
    """``nn.Embedding`` that reads its weight through ``local`` (same parameters and state-dict keys)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, local(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # fmt: skip


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Hugging Face Llama does (needed for bit-level parity)."""

    def __init__(self, dim: int | tuple[int, ...], eps: float = 1e-5):
        """``dim``: the normalised width, or a shape whose last axis it is (a DTP model's per-lane norms: (L, h))."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, local(self.weight), self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernel_dispatch.use_triton(x):  # fused Triton kernel on CUDA (kernels/rms_norm.py); below is the reference
        from kernels import ops

        return ops.rms_norm(x, weight, eps)
    # Normalise in fp32, cast back, then scale: Hugging Face's order. F.rms_norm is one fused op (2x faster on CPU
    # than the spelled-out pow/mean/rsqrt/mul, fwd+bwd) with the same math.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in one of two layouts of the same rotation (frequency i turns a pair of features by pos x theta^-2i/e):

    * rotate-half (default, the Hugging Face Llama layout): pair (i, i + e/2), so HF checkpoints convert as they are;
    * ``interleaved`` (the complex-pair form of Meta's Llama code and Kog's Laneformer): pair (2i, 2i + 1).

    Both are ``x * cos + partner(x) * sin_signed``, where partner(x) puts each feature's pair partner in its place.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, interleaved: bool = False):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        pos = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        if interleaved:  # features (2i, 2i+1) share frequency i: partner = swap within each pair
            emb = freqs.repeat_interleave(2, dim=-1)
            sin_signed = torch.stack([-freqs.sin(), freqs.sin()], dim=-1).flatten(-2)
        else:  # rotate_half(x) * sin == roll(x, e/2) * [-sin, sin]: one roll instead of chunk + neg + cat
            emb = torch.cat([freqs, freqs], dim=-1)
            sin_signed = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
        # Not persistent: derived from the config, so checkpoints stay small and dtype casts don't round it.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin_signed", sin_signed, persistent=False)
        self.max_seq_len = max_seq_len
        self.half = head_dim // 2
        self.interleaved = interleaved

    def partner(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x.roll(self.half, dims=-1)

    def forward(self, x_bnse: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Rotate by absolute position: ``position`` is the first new token's (int) or every new token's (s,)."""
        if isinstance(position, torch.Tensor):  # a static cache's input_pos: a gather, no Python int in the graph
            cos, sin_signed = self.cos[position], self.sin_signed[position]
        else:
            s = x_bnse.shape[-2]
            if position + s > self.max_seq_len:
                raise ValueError(
                    f"sequence position {position + s} exceeds max_seq_len={self.max_seq_len}; "
                    f"raise model.max_seq_len or shorten the input"
                )
            cos, sin_signed = self.cos[position : position + s], self.sin_signed[position : position + s]
        cos, sin_signed = cos.to(x_bnse.dtype), sin_signed.to(x_bnse.dtype)
        return x_bnse * cos + self.partner(x_bnse) * sin_signed


def attend(
    q_bnse: torch.Tensor,
    k_bkse: torch.Tensor,
    v_bkse: torch.Tensor,
    cache: KVCache | None,
    cache_slot: int,
    window: int | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention over the new keys, or over the KV cache when one is given.

    With a cache the new k/v are written at the cache's current position and attention runs over all cached
    positions; queries are offset so that position p attends to positions <= p. A static cache
    (``StaticKVCache.at``) always runs over its whole buffer with its mask: one shape for every step.
    ``window``: sliding-window attention, position p sees only the ``window`` positions up to p.
    """
    s = q_bnse.shape[-2]
    gqa = q_bnse.shape[1] != k_bkse.shape[1]
    start = 0
    if cache is not None and cache.static:  # the whole preallocated buffer, masked to positions <= the query's
        k_bkse, v_bkse = cache.update(cache_slot, k_bkse, v_bkse)
        mask_st = cache.mask(window)
        return F.scaled_dot_product_attention(q_bnse, k_bkse, v_bkse, attn_mask=mask_st, enable_gqa=gqa)
    if cache is not None:
        start = cache.pos
        k_bkse, v_bkse = cache.update(cache_slot, k_bkse, v_bkse)
    t = k_bkse.shape[-2]
    if window is not None and window < t:  # the window hides some keys from some queries
        if s == 1:  # one decode token: its window is the last ``window`` keys
            k_bkse, v_bkse, t = k_bkse[:, :, t - window :], v_bkse[:, :, t - window :], window
        else:
            q_pos = torch.arange(start, start + s, device=q_bnse.device)
            mask_st = causal_mask(q_pos, torch.arange(t, device=q_bnse.device), window)
            return F.scaled_dot_product_attention(q_bnse, k_bkse, v_bkse, attn_mask=mask_st, enable_gqa=gqa)
    if start == 0:
        return F.scaled_dot_product_attention(q_bnse, k_bkse, v_bkse, is_causal=s > 1, enable_gqa=gqa)
    if s == 1:  # one decode token sees the whole cache: no mask needed
        if kernel_dispatch.use_triton(q_bnse):  # Triton flash-decoding over the cache (kernels/decode_attention.py)
            from kernels import ops

            return ops.decode_attention(q_bnse.squeeze(2), k_bkse, v_bkse, t).unsqueeze(2)
        return F.scaled_dot_product_attention(q_bnse, k_bkse, v_bkse, enable_gqa=gqa)
    q_pos = torch.arange(start, start + s, device=q_bnse.device)
    mask_st = causal_mask(q_pos, torch.arange(t, device=q_bnse.device))
    return F.scaled_dot_product_attention(q_bnse, k_bkse, v_bkse, attn_mask=mask_st, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. Under tensor parallelism this module holds n/tp heads."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, rope: RotaryEmbedding):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = hidden // n_heads
        self.wq = Linear(hidden, n_heads * self.head_dim, bias=False)
        self.wk = Linear(hidden, n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(hidden, n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(n_heads * self.head_dim, hidden, bias=False)
        self.rope = rope
        self.cache_slot = -1  # set by the model: index of this layer's entry in a KVCache
        self.window: int | None = None  # set by the model on sliding-window layers (cfg.windowed_layers)

    def kv_cache_shape(self, batch: int) -> tuple[int, int, int]:
        """(batch, KV heads held here, head dim) of this layer's cache entry (a TP shard holds fewer heads)."""
        return batch, self.wk.out_features // self.head_dim, self.head_dim

    def forward(self, x_bsh: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = x_bsh.shape
        start = cache.position if cache is not None else 0
        # Head counts are read from the weights so a tensor-parallel shard (fewer heads) runs the same code.
        q = self.wq(x_bsh).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x_bsh).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x_bsh).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, start), self.rope(k, start)
        o_bnse = attend(q, k, v, cache, self.cache_slot, self.window)
        return self.wo(o_bnse.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w_gate = Linear(hidden, ffn_hidden, bias=False)
        self.w_up = Linear(hidden, ffn_hidden, bias=False)
        self.w_down = Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama decoder layer. Two communication points per layer under tensor parallelism."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, ffn_hidden: int, eps: float, rope: RotaryEmbedding):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = Attention(hidden, n_heads, n_kv_heads, rope)
        self.ffn_norm = RMSNorm(hidden, eps)
        self.ffn = FeedForward(hidden, ffn_hidden)

    @staticmethod
    def sync_plan(cfg=None) -> SyncPlan:
        return SyncPlan(blocking=2)  # Eq. 9: the attention and the FFN row-parallel sums

    def forward(self, x_bsh: torch.Tensor, comm: Communicator, cache: KVCache | None = None) -> torch.Tensor:
        x_bsh = x_bsh + comm.tp_reduce(self.attn(self.attn_norm(x_bsh), cache))  # sync 1
        return x_bsh + comm.tp_reduce(self.ffn(self.ffn_norm(x_bsh)))  # sync 2


def residual_std(init_std: float, n_residual_writes: int) -> float:
    """GPT-2 scaled init for projections that write into the residual stream."""
    return init_std / math.sqrt(max(1, n_residual_writes))
