"""Static key/value cache for prefill + decode.

One ``KVCache`` serves a whole model: each attention module owns a slot index; lane attention stores its
lanes folded into the batch axis (l*b). Buffers are allocated on first write with the exact shape that
slot needs, so the same object works for classic layers, lane stacks and tensor-parallel shards.

The model calls ``advance(s)`` once after a forward pass over s new tokens: every layer of that pass
writes at the same position ``pos``.
"""

from __future__ import annotations

import torch


class KVCache:
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

    def advance(self, s: int) -> None:
        self.pos += s

    def reset(self) -> None:
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)
