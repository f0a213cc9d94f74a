"""Data: documents -> sentencepiece -> cached token shards -> packed, resumable batches.

Public API (used by the trainer)::

    DataConfig                                   typed data options (conf/data/*.yaml)
    prepare_data(cfg, rank=0, world=1)           -> PreparedData (tokenizer + shards, cached, idempotent)
    TokenLoader(shards, seq_len, micro_batch, rank, world, seed)
        .next_batch() -> (inputs_bs, targets_bs)  .state_dict() / .load_state_dict()
    heldout_batches(prepared, seq_len, batch, max_tokens) -> [(inputs, targets), ...]
"""

from tpblocks.data.config import DataConfig, default_cache_dir
from tpblocks.data.prepare import PreparedData, data_cache_key, load_prepared, prepare_data, resolve_tokenizer
from tpblocks.data.shards import ShardError, ShardHeader, open_shard, read_header, token_dtype, write_shard
from tpblocks.data.sources import DataError, DocStats, HubUnavailableError, iter_documents
from tpblocks.data.tokenizer import bytes_per_token, load_tokenizer, train_tokenizer


def __getattr__(name: str):
    # The loader needs torch (seconds to import); tokenizer and preparation tools do not, so load it lazily.
    if name in ("TokenLoader", "heldout_batches"):
        from tpblocks.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'tpblocks.data' has no attribute {name!r}")


__all__ = [
    "DataConfig",
    "DataError",
    "DocStats",
    "HubUnavailableError",
    "PreparedData",
    "ShardError",
    "ShardHeader",
    "TokenLoader",
    "bytes_per_token",
    "data_cache_key",
    "default_cache_dir",
    "heldout_batches",
    "iter_documents",
    "load_prepared",
    "load_tokenizer",
    "open_shard",
    "prepare_data",
    "read_header",
    "resolve_tokenizer",
    "token_dtype",
    "train_tokenizer",
    "write_shard",
]
