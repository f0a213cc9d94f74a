"""prepare_data end to end: embedded corpus offline, real FineWeb rows with the Llama-2 tokenizer, cache reuse,
bad data (empty documents, invalid UTF-8, missing column, truncated shard) and the offline-hub message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from tpblocks.data import (
    DataConfig,
    DataError,
    DocStats,
    HubUnavailableError,
    ShardError,
    TokenLoader,
    heldout_batches,
    iter_documents,
    prepare_data,
)
from tpblocks.data.embedded import build_embedded_corpus, iter_embedded_documents

REPO = Path(__file__).resolve().parents[1]


def _read_stream(path: Path) -> np.ndarray:
    """Tokens of a shard read straight from the file (header size from the format spec, not from the reader)."""
    header = path.read_bytes()[:16]
    itemsize = int.from_bytes(header[12:16], "little")
    return np.fromfile(path, dtype=np.uint16 if itemsize == 2 else np.uint32, offset=128).astype(np.int64)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The default data (embedded corpus + trained tokenizer), prepared once for this module, offline."""
    cache = tmp_path_factory.mktemp("tpb_cache")
    cfg = DataConfig(cache_dir=str(cache), heldout_tokens=20_000, seq_len=64)
    return cfg, prepare_data(cfg)


def test_embedded_corpus_is_deterministic_and_sizeable(embedded):
    cfg, _ = embedded
    corpus = build_embedded_corpus(cfg.resolved_cache_dir)  # cached by the fixture
    lines = corpus.read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    assert corpus.stat().st_size > 1_000_000
    assert any(d.startswith("Topic ") for d in docs) and any(d.startswith("Module json") for d in docs)
    again = [d for _, d in zip(range(120), iter_embedded_documents())]  # a fresh pass gives the same order
    assert again == docs[:120]


def test_embedded_prepare_offline(embedded):
    cfg, prepared = embedded
    assert prepared.vocab_size == 4096 and (prepared.bos_id, prepared.eos_id) == (1, 2)
    assert prepared.n_heldout_tokens == 20_000 and prepared.n_train_tokens > 200_000
    stats = json.loads((prepared.directory / "stats.json").read_text())
    assert stats["docs_read"] == stats["docs_used"] > 100 and stats["skipped_invalid"] == 0
    assert 2.0 < stats["bytes_per_token"] < 6.0
    # The held-out stream starts with document 0 of the corpus, as BOS ... EOS.
    sp = spm.SentencePieceProcessor(model_file=str(prepared.tokenizer_path))
    first_doc = json.loads(build_embedded_corpus(cfg.resolved_cache_dir).open().readline())["text"]
    held = _read_stream(prepared.heldout_shard)
    end = int(np.flatnonzero(held == 2)[0])
    assert held[0] == 1 and sp.decode(held[1:end].tolist()) == first_doc
    # Training starts on a document boundary and batches decode to corpus text.
    train = _read_stream(prepared.train_shards[0])
    assert train[0] == 1
    x, y = TokenLoader.from_prepared(prepared, 64, 2).next_batch()
    assert x.shape == (2, 64) and int(x.max()) < 4096
    assert heldout_batches(prepared, 64, 8, 64 * 20)[0][0].shape == (8, 64)


def test_cache_reused_across_seq_len_and_keyed_by_options(embedded):
    cfg, prepared = embedded
    manifest = prepared.directory / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = prepare_data(cfg.replace(seq_len=512, seed=3))
    assert again.directory == prepared.directory and manifest.stat().st_mtime_ns == stamp
    other = prepare_data(cfg.replace(heldout_tokens=10_000, max_train_tokens=30_000, shard_tokens=8192))
    assert other.directory != prepared.directory
    assert other.n_train_tokens == 30_000 and len(other.train_shards) == 4  # 3 full shards of 8192 + the rest
    # Held-out set = first tokens of the stream: a smaller one is a prefix of the larger one.
    np.testing.assert_array_equal(_read_stream(other.heldout_shard), _read_stream(prepared.heldout_shard)[:10_000])
    # Shards are loaded as one stream across file boundaries.
    stream = np.concatenate([_read_stream(p) for p in other.train_shards])
    loader = TokenLoader.from_prepared(other, 100, 4, shuffle=False)
    for _ in range(30):
        loader.next_batch()
    x, y = loader.next_batch()  # sequences 120..123 span tokens 12000..12400 (shard 1)
    np.testing.assert_array_equal(x.numpy(), stream[12000:12400].reshape(4, 100))


def test_prepared_directory_is_self_contained(embedded, tmp_path):
    import shutil

    _, prepared = embedded
    copy = tmp_path / "copied"
    shutil.copytree(prepared.directory, copy)
    moved = prepare_data(DataConfig(source="shards", path=str(copy)))
    assert moved.directory == copy and moved.tokenizer_path == copy / "tokenizer.model"
    assert (moved.n_train_tokens, moved.tokenizer_sha256) == (prepared.n_train_tokens, prepared.tokenizer_sha256)
    (copy / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not the tokenizer the shards were written with"):
        prepare_data(DataConfig(source="shards", path=str(copy)))
    with pytest.raises(DataError, match="no manifest.json"):
        prepare_data(DataConfig(source="shards", path=str(tmp_path)))


def test_other_ranks_wait_for_rank0(embedded, tmp_path):
    cfg, prepared = embedded
    assert prepare_data(cfg, rank=1, world=2) == prepared  # already there: read, never rebuilt
    fresh = DataConfig(cache_dir=str(tmp_path), prepare_timeout_s=0.3, tokenizer_path=str(prepared.tokenizer_path))
    with pytest.raises(DataError, match="rank 1 waited.*rank 0"):
        prepare_data(fresh, rank=1, world=2)


def test_truncated_shard_in_cache_is_a_clear_error(embedded):
    cfg, _ = embedded
    small_cfg = cfg.replace(heldout_tokens=1000, max_train_tokens=5000)  # its own cache key: others unaffected
    shard = prepare_data(small_cfg).train_shards[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match="holds 4950 tokens but its header says 5000.*re-run prepare"):
        prepare_data(small_cfg)


# ------------------------------------------------------------------------------------------------ bad data
def _jsonl(path: Path) -> Path:
    lines = [
        b'{"text": "The first document is about lists and tuples in Python."}',
        b'{"text": ""}',
        b'{"text": "   \\n  "}',
        b'{"text": null}',
        b'{"text": "bad bytes \xff\xfe here"}',
        b'{"text": "lone surrogate \\ud800 here"}',
        b'{"text": "unterminated',
        b'{"text": "The second document talks about dictionaries and sets."}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_empty_and_invalid_documents_are_counted_and_skipped(embedded, tmp_path):
    cfg, prepared = embedded
    data = _jsonl(tmp_path / "bad.jsonl")
    local = DataConfig(
        source="local",
        path=str(data),
        tokenizer_path=str(prepared.tokenizer_path),
        cache_dir=str(tmp_path / "cache"),
        heldout_tokens=5,
    )
    stats = DocStats()
    docs = list(iter_documents(local, stats))
    assert [d.split()[1] for d in docs] == ["first", "second"]
    assert (stats.docs_read, stats.docs_used, stats.skipped_empty, stats.skipped_invalid) == (8, 2, 3, 3)
    assert "bad.jsonl:5" in stats.first_invalid and "UTF-8" in stats.first_invalid
    out = prepare_data(local)
    written = json.loads((out.directory / "stats.json").read_text())
    assert (written["skipped_empty"], written["skipped_invalid"], written["docs_used"]) == (3, 3, 2)
    sp = spm.SentencePieceProcessor(model_file=str(out.tokenizer_path))
    train = _read_stream(out.train_shards[0])
    assert train[0] == 1 and train[-1] == 2 and sp.decode(train[1:-1].tolist()) == docs[1]
    with pytest.raises(DataError, match=r"bad.jsonl:5: invalid UTF-8.*on_invalid=skip"):
        list(iter_documents(local.replace(on_invalid="error")))


def test_parquet_binary_invalid_utf8_and_missing_column(tmp_path):
    table = pa.table({"content": pa.array([b"good text one", b"\xc3\x28 broken", b"", b"good text two"], pa.binary())})
    path = tmp_path / "b.parquet"
    pq.write_table(table, path)
    cfg = DataConfig(source="local", path=str(path), text_field="content")
    stats = DocStats()
    assert list(iter_documents(cfg, stats)) == ["good text one", "good text two"]
    assert (stats.skipped_invalid, stats.skipped_empty) == (1, 1)
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['content'\]"):
        list(iter_documents(cfg.replace(text_field="text")))
    pq.write_table(pa.table({"text": pa.array([1, 2])}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match="not text"):
        list(iter_documents(cfg.replace(path=str(tmp_path / "i.parquet"), text_field="text")))


def test_bad_paths_and_config_values():
    with pytest.raises(DataError, match="matches no files"):
        list(iter_documents(DataConfig(source="local", path="/nonexistent/*.parquet")))
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(source="local")
    with pytest.raises(ValueError, match="needs data.tokenizer_path"):
        DataConfig(source="hub", tokenizer_path="???")
    with pytest.raises(ValueError, match="data.source=.s3. must be one of"):
        DataConfig(source="s3")
    with pytest.raises(ValueError, match=r"data has unknown key\(s\) \['seqlen'\]"):
        DataConfig.from_dict({"seqlen": 5})


def test_vocab_too_large_for_the_data(tmp_path):
    from tpblocks.data import train_tokenizer

    with pytest.raises(DataError, match="cannot train a 5000-piece tokenizer.*lower data.vocab_size"):
        train_tokenizer(["a tiny corpus of a few words"] * 5, tmp_path / "t.model", vocab_size=5000)
    assert not list(tmp_path.iterdir())  # no partial model or temporary directory left


# ---------------------------------------------------------------------------------------- FineWeb + Llama-2
def test_fineweb_parquet_with_llama2_tokenizer(shared_data, tmp_path):
    parquet = shared_data / "fineweb_sample"
    llama = shared_data / "tokenizer" / "llama2_tokenizer.model"
    cfg = DataConfig(
        source="local",
        path=str(parquet),
        tokenizer_path=str(llama),
        cache_dir=str(tmp_path),
        heldout_tokens=20_000,
        max_train_tokens=60_000,
        shard_tokens=16_384,
        seq_len=2048,
    )
    prepared = prepare_data(cfg)
    assert (prepared.vocab_size, prepared.bos_id, prepared.eos_id) == (32000, 1, 2)
    assert prepared.n_heldout_tokens == 20_000 and prepared.n_train_tokens == 60_000
    # Expected stream built independently: pyarrow rows -> sentencepiece -> BOS ids EOS.
    texts = pq.read_table(next(parquet.glob("*.parquet")), columns=["text"]).column("text").to_pylist()
    sp = spm.SentencePieceProcessor(model_file=str(llama))
    expected, docs = [], 0
    while len(expected) < 80_000:
        expected += [1, *sp.encode(texts[docs]), 2]
        docs += 1
    held = _read_stream(prepared.heldout_shard)
    np.testing.assert_array_equal(held, expected[:20_000])
    # Training starts at the document after the (cut) last held-out one.
    stats = prepared.stats
    train = np.concatenate([_read_stream(p) for p in prepared.train_shards])
    start = sum(len(sp.encode(t)) + 2 for t in texts[: stats["heldout_docs"]])
    np.testing.assert_array_equal(train, expected[start : start + 60_000])
    assert train[0] == 1 and (train == 1).sum() == stats["train_docs"]
    assert stats["stopped_at_max_train_tokens"] and stats["skipped_empty"] == 0
    x, y = TokenLoader.from_prepared(prepared, 2048, 2, seed=0).next_batch()
    assert x.shape == (2, 2048) and int(x.max()) < 32000
    assert (x[:, 1:] == y[:, :-1]).all()


# ---------------------------------------------------------------------------------------------------- hub
def test_hub_offline_gives_actionable_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = DataConfig(source="hub", cache_dir=str(tmp_path), tokenizer_path=None, vocab_size=300)
    with pytest.raises(HubUnavailableError, match=r"HuggingFaceFW/fineweb-edu.*data.source=local data.path="):
        prepare_data(cfg)


def test_hub_no_network_gives_actionable_message(monkeypatch):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HubUnavailableError, match="ConnectionError.*data.source=local"):
        list(iter_documents(DataConfig(source="hub")))


def test_hub_streaming_path_on_a_local_dataset(tmp_path):
    """The hub code path (load_dataset streaming + split_dataset_by_node) on a dataset directory, offline."""
    texts = [f"document number {i} says hello" for i in range(10)]
    pq.write_table(pa.table({"text": texts, "id": list(range(10))}), tmp_path / "train.parquet")
    cfg = DataConfig(source="hub", hub_name=str(tmp_path), hub_subset=None)
    assert list(iter_documents(cfg)) == texts
    parts = [list(iter_documents(cfg, rank=r, world=2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(texts) and not set(parts[0]) & set(parts[1])
    with pytest.raises(DataError, match=r"no field 'body'; its fields are \['id', 'text'\]"):
        list(iter_documents(cfg.replace(text_field="body")))


def test_cli_reports_offline_hub_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TPBLOCKS_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train_tokenizer.py"), "--source", "hub", "--out", "x.model"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "data.source=local data.path=" in proc.stderr and "Traceback" not in proc.stderr
