"""Token shard files: header round trip and one clear error per kind of corruption."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tpblocks.data.shards import HEADER_BYTES, ShardError, open_shard, read_header, token_dtype, write_shard

SHA = "ab" * 32


def _write(path, tokens, vocab):
    return write_shard(path, np.asarray(tokens), vocab_size=vocab, bos_id=1, eos_id=2, tokenizer_sha256=SHA)


@pytest.mark.parametrize("vocab, itemsize", [(4096, 2), (65536, 2), (65537, 4), (200_000, 4)])
def test_round_trip_and_dtype_by_vocab(tmp_path, vocab, itemsize):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=1000)
    tokens[:2] = [0, vocab - 1]  # both ends of the vocabulary survive the narrow dtype
    path = _write(tmp_path / "s.bin", tokens, vocab)
    assert path.stat().st_size == 128 + 1000 * itemsize  # header size and packing, stated independently
    header, mm = open_shard(path, expect_tokenizer_sha256=SHA)
    assert (header.itemsize, header.n_tokens, header.vocab_size) == (itemsize, 1000, vocab)
    assert (header.bos_id, header.eos_id, header.tokenizer_sha256) == (1, 2, SHA)
    np.testing.assert_array_equal(np.asarray(mm, dtype=np.int64), tokens)
    assert token_dtype(vocab).itemsize == itemsize
    assert not [p for p in tmp_path.iterdir() if p.name != "s.bin"]  # no temporary file left behind


def test_empty_shard_round_trip(tmp_path):
    path = _write(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), 100)
    header, mm = open_shard(path)
    assert header.n_tokens == 0 and mm.size == 0


def test_wrong_magic(tmp_path):
    path = tmp_path / "not_a_shard.bin"
    path.write_bytes(b"PAR1" + b"\0" * 300)
    with pytest.raises(ShardError, match="not a tpblocks token shard"):
        read_header(path)


def test_wrong_version(tmp_path):
    path = _write(tmp_path / "s.bin", np.arange(10), 100)
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="format version 99"):
        read_header(path)


def test_truncated_shard_names_counts(tmp_path):
    path = _write(tmp_path / "s.bin", np.arange(1000), 4096)
    raw = path.read_bytes()
    path.write_bytes(raw[: HEADER_BYTES + 2 * 600 + 1])  # 600.5 tokens left
    with pytest.raises(ShardError, match=r"holds 600 tokens but its header says 1000.*truncated.*re-run prepare"):
        read_header(path)


def test_shard_longer_than_header(tmp_path):
    path = _write(tmp_path / "s.bin", np.arange(10), 4096)
    with open(path, "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ShardError, match="holds 12 tokens but its header says 10.*longer"):
        read_header(path)


def test_file_shorter_than_header(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"TPBTOKS\0" + b"\0" * 10)
    with pytest.raises(ShardError, match="shorter than its 128-byte header"):
        read_header(path)


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        read_header(tmp_path / "nope.bin")


def test_other_tokenizer_refused(tmp_path):
    path = _write(tmp_path / "s.bin", np.arange(10), 4096)
    with pytest.raises(ShardError, match="different preparations"):
        open_shard(path, expect_tokenizer_sha256="cd" * 32)


def test_ids_outside_vocab_refused_on_write(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        _write(tmp_path / "s.bin", np.array([5, 100]), 100)
    assert not list(tmp_path.iterdir())
