"""TokenLoader: packing, determinism, exact resume, world-size independent global batches; held-out batches.

The shards hold ``arange(N)`` (vocab > N, uint32), so every token names its own position: a window starting at
token ``t`` is sequence ``t // seq_len``, which lets the tests check the mapping without reusing loader code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tpblocks.data import PreparedData, TokenLoader, heldout_batches, write_shard

L = 8  # seq_len
N = 8 * 60 + 1  # 60 sequences exactly
VOCAB = 100_000


def _shards(tmp_path, n=N, cuts=(100, 250)):
    """arange(n) split into several shards at ``cuts`` (windows straddle shard boundaries)."""
    tokens = np.arange(n)
    paths = []
    for i, part in enumerate(np.split(tokens, cuts)):
        paths.append(
            write_shard(tmp_path / f"t{i}.bin", part, vocab_size=VOCAB, bos_id=1, eos_id=2, tokenizer_sha256="")
        )
    return paths


def _seq_ids(inputs):
    first = inputs[:, 0].numpy()
    assert (first % L == 0).all()
    return (first // L).tolist()


def _run(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def test_windows_are_packed_and_shifted(tmp_path):
    loader = TokenLoader(_shards(tmp_path), L, 4, shuffle=False)
    for step in range(3):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (4, L) and y.shape == (4, L)
        expected = torch.arange(step * 4 * L, (step + 1) * 4 * L).view(4, L)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
        torch.testing.assert_close(y, expected + 1, rtol=0, atol=0)


def test_shuffled_epoch_is_a_permutation_and_seeded(tmp_path):
    shards = _shards(tmp_path)
    orders = {}
    for seed in (0, 0, 1):
        loader = TokenLoader(shards, L, 5, seed=seed)
        ids = [q for x, _ in _run(loader, 12) for q in _seq_ids(x)]  # 12 x 5 = 60 = one epoch
        assert sorted(ids) == list(range(60))
        orders.setdefault(seed, []).append(ids)
    assert orders[0][0] == orders[0][1]  # deterministic
    assert orders[0][0] != orders[1][0]  # the seed matters
    assert orders[0][0] != list(range(60))  # and shuffles


def test_second_epoch_reshuffles_and_covers_all(tmp_path):
    loader = TokenLoader(_shards(tmp_path), L, 6, seed=3)
    ids = [q for x, _ in _run(loader, 20) for q in _seq_ids(x)]
    first, second = ids[:60], ids[60:]
    assert sorted(first) == sorted(second) == list(range(60))
    assert first != second
    assert loader.epoch == 2


def test_resume_is_exact(tmp_path):
    shards = _shards(tmp_path)
    reference = _run(TokenLoader(shards, L, 3, seed=7), 30)  # crosses the epoch boundary (20 steps/epoch)
    first = TokenLoader(shards, L, 3, seed=7)
    _run(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON / checkpoint round trip
    resumed = TokenLoader(shards, L, 3, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(_run(resumed, 13), reference[17:]):
        torch.testing.assert_close(x, rx, rtol=0, atol=0)
        torch.testing.assert_close(y, ry, rtol=0, atol=0)


def _global_sets(shards, world, micro, accum, steps, seed=5):
    """Per optimizer step: the set of sequence ids read by all ranks over all accumulation micro-steps."""
    loaders = [TokenLoader(shards, L, micro, rank=r, world=world, seed=seed) for r in range(world)]
    out = []
    per_rank = [[] for _ in range(world)]
    for _ in range(steps):
        seen = []
        for _ in range(accum):
            for r, loader in enumerate(loaders):
                ids = _seq_ids(loader.next_batch()[0])
                per_rank[r].extend(ids)
                seen.extend(ids)
        assert len(seen) == len(set(seen)), "a sequence was read twice within one optimizer step"
        out.append(sorted(seen))
    return out, per_rank


@pytest.mark.parametrize(
    "split_a, split_b",
    [((1, 4, 1), (2, 2, 1)), ((1, 2, 2), (2, 2, 1)), ((1, 1, 4), (4, 1, 1)), ((2, 1, 2), (1, 4, 1))],
)
def test_global_batch_independent_of_world_size(tmp_path, split_a, split_b):
    shards = _shards(tmp_path)
    sets_a, _ = _global_sets(shards, *split_a, steps=20)  # 20 x 4 = 80 sequences: crosses into epoch 2
    sets_b, per_rank = _global_sets(shards, *split_b, steps=20)
    assert sets_a == sets_b
    if split_b[0] > 1:  # ranks read disjoint sequences within an epoch
        first_epoch = [set(ids[: 60 // split_b[0]]) for ids in per_rank]
        assert set.intersection(*first_epoch) == set()


def test_resume_with_another_world_size(tmp_path):
    shards = _shards(tmp_path)
    one = TokenLoader(shards, L, 4, seed=2)
    reference = _run(one, 8)
    restarted = TokenLoader(shards, L, 4, seed=2)
    _run(restarted, 5)
    state = restarted.state_dict()
    pair = [TokenLoader(shards, L, 2, rank=r, world=2, seed=2) for r in range(2)]
    for loader in pair:
        loader.load_state_dict(state)
    for step in range(5, 8):
        got = sorted(q for loader in pair for q in _seq_ids(loader.next_batch()[0]))
        assert got == sorted(_seq_ids(reference[step][0]))


def test_resume_refuses_other_order_or_misaligned_cursor(tmp_path):
    shards = _shards(tmp_path)
    loader = TokenLoader(shards, L, 3, seed=0)
    _run(loader, 1)
    with pytest.raises(ValueError, match="seed=0"):
        TokenLoader(shards, L, 3, seed=1).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(shards, 4, 3, seed=0).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="not a multiple of micro_batch"):
        TokenLoader(shards, L, 2, seed=0).load_state_dict(loader.state_dict())


def test_too_few_tokens_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenLoader(_shards(tmp_path, n=20, cuts=(5,)), 32, 1)
    with pytest.raises(ValueError, match="rank=2"):
        TokenLoader(_shards(tmp_path), L, 1, rank=2, world=2)


def _prepared(tmp_path, n_heldout):
    held = write_shard(
        tmp_path / "heldout.bin", np.arange(n_heldout), vocab_size=VOCAB, bos_id=1, eos_id=2, tokenizer_sha256=""
    )
    return PreparedData(
        tokenizer_path=tmp_path / "none.model",
        vocab_size=VOCAB,
        bos_id=1,
        eos_id=2,
        train_shards=_shards(tmp_path),
        heldout_shard=held,
        n_train_tokens=N,
    )


def test_heldout_batches_fixed_in_order_and_capped(tmp_path):
    prepared = _prepared(tmp_path, 8 * 10 + 1)  # 10 windows
    batches = heldout_batches(prepared, L, 4, None)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    torch.testing.assert_close(inputs, torch.arange(80).view(10, L), rtol=0, atol=0)
    torch.testing.assert_close(targets, torch.arange(1, 81).view(10, L), rtol=0, atol=0)
    capped = heldout_batches(prepared, L, 4, max_tokens=5 * L)
    assert sum(x.shape[0] for x, _ in capped) == 5
    split = [heldout_batches(prepared, L, 4, None, rank=r, world=2) for r in range(2)]
    assert [len(s) for s in split] == [2, 1]
    torch.testing.assert_close(split[0][1][0], batches[2][0], rtol=0, atol=0)


def test_heldout_too_short_and_empty(tmp_path):
    with pytest.raises(ValueError, match="raise data.heldout_tokens"):
        heldout_batches(_prepared(tmp_path, 5), L, 4, None)
    assert heldout_batches(_prepared(tmp_path, 0), L, 4, None) == []
