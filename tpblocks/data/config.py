"""Typed, validated data configuration (Hydra group ``conf/data/``).

One frozen dataclass says where documents come from, how they become tokens and where the prepared token
shards are cached. Every field is checked in ``__post_init__`` and a bad value is reported as a
``ValueError`` naming the field and the fix, so a typo in ``data.source=`` fails before any download.

Sources
  embedded  a corpus built from this Python installation's own documentation (pydoc topics + stdlib
            docstrings): needs no network and no files, the default of a fresh clone
  local     parquet / jsonl(.gz) / txt files: ``path`` is a file, a directory or a glob
  hub       a Hugging Face dataset read with ``datasets.load_dataset(..., streaming=True)``;
            default FineWeb-Edu ``sample-10BT`` (report §5.3.1); the dedup variant is
            ``hub_name=HuggingFaceTB/smollm-corpus hub_subset=fineweb-edu-dedup``
  shards    an already prepared directory (``manifest.json`` + ``*.bin``), e.g. copied from another machine
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tpblocks.typed import check_fields, from_mapping
from tpblocks.typed import require as _require

Source = Literal["embedded", "local", "hub", "shards"]
OnInvalid = Literal["skip", "error"]

SOURCES = ("embedded", "local", "hub", "shards")
ON_INVALID = ("skip", "error")


def default_cache_dir() -> Path:
    """``$TPBLOCKS_CACHE`` when set, else ``~/.cache/tpblocks``."""
    env = os.environ.get("TPBLOCKS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tpblocks"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training text comes from and how it is tokenised, split and cached."""

    source: Source = "embedded"
    path: str | None = None  # local: file, directory or glob; shards: a prepared directory
    hub_name: str = "HuggingFaceFW/fineweb-edu"
    hub_subset: str | None = "sample-10BT"  # dataset config name; None = the dataset's default
    hub_split: str = "train"
    streaming: bool = True  # hub: stream rows instead of downloading the whole subset first
    text_field: str = "text"

    # Tokenizer: a sentencepiece .model file (e.g. the Llama-2 32k one), or None to train a BPE model with
    # byte fallback on the first `tokenizer_train_bytes` of the same documents (cached by content hash).
    tokenizer_path: str | None = None
    vocab_size: int = 4096  # only used when training a tokenizer
    tokenizer_train_bytes: int = 100_000_000

    cache_dir: str | None = None  # None = $TPBLOCKS_CACHE or ~/.cache/tpblocks
    # Report §5.3.1: "We split it to keep 400k tokens as a test set". The held-out set is the FIRST
    # `heldout_tokens` tokens of the stream (whole documents, the last one cut); training starts at the
    # next document, so the two never share a document and the held-out set does not move when
    # `max_train_tokens` changes.
    heldout_tokens: int = 400_000
    max_train_tokens: int | None = None  # stop reading after this many training tokens (tiny runs, hub)
    shard_tokens: int = 100_000_000  # tokens per training shard file (200 MB at uint16)
    on_invalid: OnInvalid = "skip"  # invalid UTF-8 / malformed rows: count and skip, or stop with an error

    # Packing and order (used by the trainer when it builds TokenLoader; not part of the cache key, so a
    # sweep over seq_len or seeds reuses the same shards).
    seq_len: int = 2048
    seed: int = 0  # order of packed sequences; keep it fixed across experiments (report: no reshuffling)
    shuffle: bool = True  # False = sequences in stream order

    encode_threads: int | None = None  # sentencepiece threads; None = all cores
    prepare_timeout_s: float = 7200.0  # ranks > 0 wait this long for rank 0's prepared shards

    def __post_init__(self) -> None:
        check_fields(self, "data")
        _require(self.source in SOURCES, f"data.source={self.source!r} is not one of {SOURCES}")
        # "???" is OmegaConf's "mandatory, not given" marker (conf/data/fineweb_edu.yaml, local.yaml).
        _require(
            self.path != "???", f"data.source={self.source} needs data.path=/path/to/*.parquet (a file, dir or glob)"
        )
        _require(
            self.tokenizer_path != "???",
            f"data.source={self.source} needs data.tokenizer_path=/path/to/tokenizer.model (e.g. the Llama-2 "
            "sentencepiece model), or data.tokenizer_path=null to train one on the data",
        )
        if self.source in ("local", "shards"):
            _require(
                bool(self.path),
                f"data.source={self.source} needs data.path (a file, directory or glob), "
                "e.g. data.path=/data/fineweb/*.parquet",
            )
        if self.source == "hub":
            _require(
                bool(self.hub_name), "data.hub_name must name a Hugging Face dataset, e.g. HuggingFaceFW/fineweb-edu"
            )
        _require(bool(self.text_field), "data.text_field must name the text column, e.g. text")
        _require(bool(self.hub_split), "data.hub_split must be a split name, e.g. train")
        if self.tokenizer_path is not None:
            _require(
                str(self.tokenizer_path).endswith(".model"),
                f"data.tokenizer_path={self.tokenizer_path!r} must be a sentencepiece .model file "
                "(or null to train one on the data)",
            )
        _require(
            260 <= self.vocab_size <= 1_000_000,
            f"data.vocab_size={self.vocab_size} must be in [260, 1000000] (byte fallback alone needs 259 pieces)",
        )
        _require(self.tokenizer_train_bytes >= 10_000, "data.tokenizer_train_bytes must be at least 10000")
        _require(self.heldout_tokens >= 0, f"data.heldout_tokens={self.heldout_tokens} must be >= 0")
        if self.max_train_tokens is not None:
            _require(self.max_train_tokens > 0, f"data.max_train_tokens={self.max_train_tokens} must be > 0 or null")
        _require(self.shard_tokens >= 1024, f"data.shard_tokens={self.shard_tokens} must be at least 1024")
        _require(self.on_invalid in ON_INVALID, f"data.on_invalid={self.on_invalid!r} is not one of {ON_INVALID}")
        _require(self.seq_len >= 1, f"data.seq_len={self.seq_len} must be >= 1")
        if self.encode_threads is not None:
            _require(self.encode_threads >= 1, f"data.encode_threads={self.encode_threads} must be >= 1 or null")
        _require(self.prepare_timeout_s > 0, "data.prepare_timeout_s must be > 0")

    # ------------------------------------------------------------------ helpers
    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.data)``), naming unknown keys."""
        return from_mapping(cls, values, "data")

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)
