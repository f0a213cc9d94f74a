"""Packed training batches with a world-size independent order and exact resume; held-out batches.

Packing. The training shards are one token stream T (documents as BOS … EOS, back to back). Sequence ``q``
is the window ``T[q*L : q*L + L + 1]`` (L = seq_len): inputs are its first L tokens, targets the last L.
There are ``n_seq = (len(T) - 1) // L`` sequences; consecutive windows share one token, as in nanoGPT.

Order. Sequences are consumed through global *slots* 0, 1, 2, …: slot ``s`` is epoch ``e = s // n_seq``,
position ``i = s % n_seq`` and holds sequence ``perm_e[i]``, where ``perm_e`` is a permutation drawn from
``(seed, e)`` (``shuffle=False``: the identity, stream order). Keep ``seed`` fixed across experiments so every
experiment sees the same data in the same order (report §5.3.1: no reshuffling between experiments).

Ranks. With G = micro_batch * world, the k-th ``next_batch()`` of rank r returns slots
``k*G + r*micro_batch + j`` for j < micro_batch: rank r takes the r-th contiguous part of the k-th block of G
slots. Every rank advances the same global cursor, so one optimizer step of S sequences (S = micro_batch ×
world × accumulation) consumes exactly slots ``[t*S, (t+1)*S)`` however S is split over ranks, micro-batches
and accumulation steps: (world=1, micro=2m) and (world=2, micro=m) see the same global batch, as do
(world=1, accum=2a) and (world=2, accum=a).

Resume. ``state_dict()`` holds the global cursor (identical on every rank) plus what fixes the order;
``load_state_dict`` refuses a state taken with other data, seq_len, seed or shuffle, and a cursor that is not a
multiple of this run's G. A run may resume with another world size when the cursor is a multiple of its G.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from tpblocks.data.prepare import PreparedData
from tpblocks.data.shards import open_shard

log = logging.getLogger(__name__)

STATE_VERSION = 1


class _TokenStream:
    """Several shards read as one array (only the windows asked for are copied out of the memory maps)."""

    def __init__(self, shards: Sequence[str | Path], expect_tokenizer_sha256: str | None = None) -> None:
        if not shards:
            raise ValueError("no token shards given: prepare the data first (tpblocks.data.prepare_data)")
        self.arrays = [open_shard(p, expect_tokenizer_sha256=expect_tokenizer_sha256)[1] for p in shards]
        sizes = np.array([a.size for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.n_tokens
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            take = min(length - filled, self.arrays[shard].size - offset)
            out[filled : filled + take] = self.arrays[shard][offset : offset + take]
            filled += take
            shard += 1
        return out


class TokenLoader:
    """Deterministic packed batches for rank ``rank`` of ``world``; see the module docstring for the mapping."""

    def __init__(
        self,
        shards: Sequence[str | Path],
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        *,
        shuffle: bool = True,
        expect_tokenizer_sha256: str | None = None,
    ) -> None:
        if seq_len < 1 or micro_batch < 1:
            raise ValueError(f"seq_len={seq_len} and micro_batch={micro_batch} must be >= 1")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank={rank} must be in [0, world={world})")
        self.stream = _TokenStream(shards, expect_tokenizer_sha256)
        self.seq_len, self.micro_batch, self.rank, self.world = seq_len, micro_batch, rank, world
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.n_sequences = (self.stream.n_tokens - 1) // seq_len
        if self.n_sequences < 1:
            raise ValueError(
                f"the training shards hold {self.stream.n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "lower data.seq_len or prepare more data (data.max_train_tokens)"
            )
        self.next_slot = 0  # global cursor: slots consumed by all ranks together
        self._perm_epoch = -1
        self._warned_epoch = 0
        self._perm: np.ndarray | None = None

    @classmethod
    def from_prepared(
        cls,
        prepared: PreparedData,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        *,
        shuffle: bool = True,
    ) -> TokenLoader:
        """A loader over ``prepared.train_shards`` that also checks they match the prepared tokenizer."""
        return cls(
            prepared.train_shards,
            seq_len,
            micro_batch,
            rank,
            world,
            seed,
            shuffle=shuffle,
            expect_tokenizer_sha256=prepared.tokenizer_sha256 or None,
        )

    # ---------------------------------------------------------------------------------------------- order
    @property
    def global_batch(self) -> int:
        """Sequences consumed by one ``next_batch()`` call on every rank together (micro_batch × world)."""
        return self.micro_batch * self.world

    @property
    def epoch(self) -> int:
        return self.next_slot // self.n_sequences

    def _order(self, epoch: int) -> np.ndarray | None:
        if epoch > self._warned_epoch:
            if epoch > 0:
                log.warning("data: starting epoch %d over %d sequences (the data repeats)", epoch, self.n_sequences)
            self._warned_epoch = epoch
        if not self.shuffle:
            return None
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            dtype = np.uint32 if self.n_sequences < 2**32 else np.uint64
            self._perm = rng.permutation(self.n_sequences).astype(dtype)
            self._perm_epoch = epoch
        return self._perm

    def sequence_ids(self, slots: np.ndarray) -> np.ndarray:
        """Sequence index (window start / seq_len) held by each global slot."""
        out = np.empty(len(slots), dtype=np.int64)
        for j, slot in enumerate(slots):
            epoch, pos = divmod(int(slot), self.n_sequences)
            perm = self._order(epoch)
            out[j] = pos if perm is None else int(perm[pos])
        return out

    def rank_slots(self, next_slot: int | None = None) -> np.ndarray:
        """Global slots the next ``next_batch()`` of this rank returns."""
        base = (self.next_slot if next_slot is None else next_slot) + self.rank * self.micro_batch
        return base + np.arange(self.micro_batch, dtype=np.int64)

    # ----------------------------------------------------------------------------------------------- batches
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_bs, targets_bs), both int64 of shape (micro_batch, seq_len); advances the global cursor."""
        ids = self.sequence_ids(self.rank_slots())
        window_bs = np.stack([self.stream.read(int(q) * self.seq_len, self.seq_len + 1) for q in ids])
        self.next_slot += self.global_batch
        window_bs = torch.from_numpy(window_bs)
        return window_bs[:, :-1].contiguous(), window_bs[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Position and order identity; the same on every rank (save it from rank 0)."""
        return {
            "version": STATE_VERSION,
            "next_slot": int(self.next_slot),
            "seq_len": self.seq_len,
            "n_tokens": self.stream.n_tokens,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "tokens_consumed": int(self.next_slot) * self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; refuses states that would replay other batches."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seq_len", "n_tokens", "seed", "shuffle"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the data position: the checkpoint's loader had {key}={state[key]!r}, this run "
                    f"has {key}={mine[key]!r}; resuming would not replay the same batches. Use the same data "
                    "preparation, data.seq_len and data.seed as the checkpointed run"
                )
        slot = int(state["next_slot"])
        if slot % self.global_batch:
            raise ValueError(
                f"the checkpoint stopped at global sequence {slot}, not a multiple of micro_batch × world = "
                f"{self.global_batch} of this run; resume with a micro-batch/world split that divides it"
            )
        self.next_slot = slot


def heldout_batches(
    prepared: PreparedData,
    seq_len: int,
    batch: int,
    max_tokens: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out set as (inputs, targets) int64 batches, in stream order, never shuffled.

    Windows of ``seq_len + 1`` tokens packed from the start of the held-out shard as in training, at most
    ``max_tokens // seq_len`` of them (all when None), grouped by ``batch`` (the last batch may be smaller).
    With ``world > 1`` rank r gets batches r, r + world, … (sum loss and token counts over ranks). Returns
    ``[]`` when the data was prepared with ``heldout_tokens=0``.
    """
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len={seq_len} and batch={batch} must be >= 1")
    _, tokens = open_shard(prepared.heldout_shard, expect_tokenizer_sha256=prepared.tokenizer_sha256 or None)
    if tokens.size == 0:
        return []
    n_seq = (tokens.size - 1) // seq_len
    if n_seq < 1:
        raise ValueError(
            f"the held-out set holds {tokens.size} tokens, fewer than seq_len + 1 = {seq_len + 1}; raise "
            "data.heldout_tokens or lower data.seq_len"
        )
    if max_tokens is not None:
        n_seq = max(1, min(n_seq, max_tokens // seq_len))
    windows = np.asarray(tokens[: n_seq * seq_len + 1], dtype=np.int64)
    out = []
    for i, start in enumerate(range(0, n_seq, batch)):
        if i % world != rank:
            continue
        stop = min(start + batch, n_seq)
        window_bs = np.stack([windows[q * seq_len : q * seq_len + seq_len + 1] for q in range(start, stop)])
        window_bs = torch.from_numpy(window_bs)
        out.append((window_bs[:, :-1].contiguous(), window_bs[:, 1:].contiguous()))
    return out
