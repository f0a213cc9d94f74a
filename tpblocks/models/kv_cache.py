"""Static key/value cache for prefill + decode.

One ``KVCache`` serves a whole model: each attention module owns a slot index; lane attention stores its
lanes folded into the batch axis (l*b). Buffers are allocated on first write with the exact shape that
slot needs, so the same object works for classic layers, lane stacks and tensor-parallel shards.

The model calls ``advance(s)`` once after a forward pass over s new tokens: every layer of that pass
writes at the same position ``pos``.

``StaticKVCache`` (below) is the compiled decode engine's cache: buffers sized once and a position tensor
instead of a Python int, so one graph serves every step. Layers tell the two apart by ``cache.static``.
"""

from __future__ import annotations

import torch


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(s, t) boolean mask: query position p sees key positions k <= p, and only k > p - window when windowed."""
    mask_st = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask_st = mask_st & (k_pos[None, :] > q_pos[:, None] - window)
    return mask_st


class KVCache:
    static = False

    def __init__(self, n_slots: int, max_seq_len: int):
        if n_slots <= 0:
            raise ValueError(f"n_slots={n_slots} must be positive")
        self.max_seq_len = max_seq_len
        self.pos = 0
        self._k: list[torch.Tensor | None] = [None] * n_slots
        self._v: list[torch.Tensor | None] = [None] * n_slots

    def update(self, slot: int, k_bkse: torch.Tensor, v_bkse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at ``pos`` and return the cached prefix including them."""
        if slot < 0 or slot >= len(self._k):
            raise IndexError(f"cache slot {slot} out of range (model has {len(self._k)} attention layers)")
        s = k_bkse.shape[-2]
        end = self.pos + s
        if end > self.max_seq_len:
            raise ValueError(f"KV cache full: {end} positions > max_seq_len={self.max_seq_len}")
        if self._k[slot] is None:
            b, k, _, e = k_bkse.shape
            self._k[slot] = k_bkse.new_zeros(b, k, self.max_seq_len, e)
            self._v[slot] = v_bkse.new_zeros(b, k, self.max_seq_len, e)
        # Detached: the cache is an inference structure; gradients through it are never wanted.
        self._k[slot][:, :, self.pos : end] = k_bkse.detach()
        self._v[slot][:, :, self.pos : end] = v_bkse.detach()
        return self._k[slot][:, :, :end], self._v[slot][:, :, :end]

    @property
    def position(self) -> int:
        """Absolute position of the first new token, for RoPE."""
        return self.pos

    def advance(self, s: int) -> None:
        self.pos += s

    def reset(self) -> None:
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)


class StaticKVCache:
    """Preallocated key/value buffers for a compiled decode step (gpt-fast's layout, per attention module).

    Sized once by ``TransformerLM.setup_cache(batch, max_seq_len, dtype, device)``: every buffer has its final
    shape, so a decode step has no shape that changes from token to token. The position is not held here:
    each forward gets a positioned view, ``cache.at(input_pos)``, whose ``input_pos`` tensor (s,) says where
    the s new tokens go. Attention then reads the whole buffer with the mask ``key position <= query
    position`` (and ``> query position - window`` on sliding-window layers): positions not yet written (zeros)
    are masked out, so the graph never slices by a length.

    ``shapes[slot] = (B, k, e)``: the slot's batch (lanes folded in: l*b), KV heads and head dim.
    """

    static = True

    def __init__(self, shapes: list[tuple[int, int, int]], max_seq_len: int, dtype: torch.dtype, device):
        if not shapes:
            raise ValueError("the model has no attention layer to cache")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len={max_seq_len} must be positive")
        self.max_seq_len = max_seq_len
        self._k = [torch.zeros(b, k, max_seq_len, e, dtype=dtype, device=device) for b, k, e in shapes]
        self._v = [torch.zeros(b, k, max_seq_len, e, dtype=dtype, device=device) for b, k, e in shapes]
        self.key_pos = torch.arange(max_seq_len, device=device)
        for t in self._k + self._v:  # fixed addresses: CUDA graphs may then mutate them in place
            torch._dynamo.mark_static_address(t)

    def at(self, input_pos: torch.Tensor) -> CacheAt:
        return CacheAt(self, input_pos)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)


class CacheAt:
    """A ``StaticKVCache`` positioned at ``input_pos`` (s,) for one forward; what the model's layers receive."""

    static = True

    def __init__(self, cache: StaticKVCache, input_pos: torch.Tensor):
        self.cache = cache
        self.input_pos = input_pos
        self._masks: dict[int | None, torch.Tensor] = {}  # (s, t) masks over the whole buffer, one per window size

    def mask(self, window: int | None = None) -> torch.Tensor:
        """Key position <= query position (and > query position - ``window``), shared by the layers of a forward."""
        if window not in self._masks:
            self._masks[window] = causal_mask(self.input_pos, self.cache.key_pos, window)
        return self._masks[window]

    @property
    def position(self) -> torch.Tensor:
        """Absolute positions of the new tokens, for RoPE."""
        return self.input_pos

    def update(self, slot: int, k_bkse: torch.Tensor, v_bkse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at ``input_pos``; return the whole buffers."""
        k_all, v_all = self.cache._k[slot], self.cache._v[slot]
        k_all.index_copy_(2, self.input_pos, k_bkse.detach().to(k_all.dtype))
        v_all.index_copy_(2, self.input_pos, v_bkse.detach().to(v_all.dtype))
        return k_all, v_all

    def advance(self, s: int) -> None:
        """Positions are the caller's (``input_pos``): nothing to advance."""
