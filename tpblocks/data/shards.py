"""Token shard files: a self-describing header followed by raw little-endian token ids.

Layout (after llm.c's ``fineweb.py``, with every field checked on read)::

    offset  size  field
    0       8     magic  b"TPBTOKS\\0"
    8       4     format version (uint32)          = SHARD_VERSION
    12      4     bytes per token (uint32)         2 (uint16, vocab <= 65536) or 4 (uint32)
    16      8     token count N (uint64)
    24      4     vocab size (uint32)
    28      4     BOS id (int32, -1 = none)
    32      4     EOS id (int32, -1 = none)
    36      32    sha256 of the tokenizer .model file (raw bytes)
    68      60    zero padding up to HEADER_BYTES = 128
    128     N*b   token ids

A shard whose size does not match its header (a copy cut short, a crashed writer) is refused with a message
saying how many tokens it holds and how to rebuild it; a shard written with another tokenizer is refused when
the caller passes the expected tokenizer hash. Writes go to a temporary file and are renamed into place, so a
reader never sees a half-written shard under its final name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"TPBTOKS\0"
SHARD_VERSION = 1
HEADER_BYTES = 128
_HEADER = struct.Struct("<8sIIQIii32s")
assert _HEADER.size <= HEADER_BYTES

_REBUILD = "delete that directory (or the whole cache) and re-run prepare"


class ShardError(ValueError):
    """A token shard file is missing, corrupt, truncated or from another tokenizer."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of this size."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True, kw_only=True)
class ShardHeader:
    """Decoded header of one shard."""

    version: int
    itemsize: int
    n_tokens: int
    vocab_size: int
    bos_id: int
    eos_id: int
    tokenizer_sha256: str  # hex

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.itemsize == 2 else np.dtype(np.uint32)


def write_shard(
    path: str | Path, tokens: np.ndarray, *, vocab_size: int, bos_id: int, eos_id: int, tokenizer_sha256: str
) -> Path:
    """Write ``tokens`` (1-D ints) with a header, atomically (tmp file + rename). Returns the path."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but vocab_size={vocab_size}: "
            "the tokenizer and the declared vocabulary disagree"
        )
    digest = bytes.fromhex(tokenizer_sha256) if tokenizer_sha256 else b""
    if len(digest) not in (0, 32):
        raise ValueError(f"tokenizer_sha256 must be 64 hex characters, got {tokenizer_sha256!r}")
    header = _HEADER.pack(
        MAGIC, SHARD_VERSION, dtype.itemsize, tokens.size, vocab_size, bos_id, eos_id, digest.ljust(32, b"\0")
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_header(path: str | Path) -> ShardHeader:
    """Read and check the header of ``path`` against the file size. Raises ``ShardError`` with a fix."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"token shard {path} does not exist; {_REBUILD}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"token shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header: the file is "
            f"truncated; {_REBUILD}"
        )
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    magic, version, itemsize, n_tokens, vocab_size, bos_id, eos_id, digest = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(
            f"{path} is not a tpblocks token shard (magic {magic!r}, expected {MAGIC!r}); point data.path at a "
            "directory written by prepare_data, or use data.source=local for raw parquet/jsonl files"
        )
    if version != SHARD_VERSION:
        raise ShardError(
            f"token shard {path} has format version {version}, this tpblocks reads version {SHARD_VERSION}; {_REBUILD}"
        )
    if itemsize not in (2, 4):
        raise ShardError(f"token shard {path} declares {itemsize} bytes per token (expected 2 or 4); {_REBUILD}")
    expected = HEADER_BYTES + n_tokens * itemsize
    if size != expected:
        held = (size - HEADER_BYTES) // itemsize
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(
            f"token shard {path} holds {held} tokens but its header says {n_tokens}: the file is {what}; {_REBUILD}"
        )
    return ShardHeader(
        version=version,
        itemsize=itemsize,
        n_tokens=n_tokens,
        vocab_size=vocab_size,
        bos_id=bos_id,
        eos_id=eos_id,
        tokenizer_sha256=digest.hex() if digest.strip(b"\0") else "",
    )


def open_shard(path: str | Path, *, expect_tokenizer_sha256: str | None = None) -> tuple[ShardHeader, np.ndarray]:
    """Check ``path`` and return (header, read-only memory map of its tokens)."""
    header = read_header(path)
    if expect_tokenizer_sha256 and header.tokenizer_sha256 != expect_tokenizer_sha256:
        raise ShardError(
            f"token shard {path} was written with tokenizer sha256 {header.tokenizer_sha256[:12] or '?'}…, "
            f"not the expected {expect_tokenizer_sha256[:12]}…: shards and tokenizer come from different "
            f"preparations; {_REBUILD}"
        )
    if header.n_tokens == 0:
        return header, np.zeros(0, dtype=header.dtype)
    tokens = np.memmap(
        path, dtype=header.dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(header.n_tokens,)
    )
    return header, tokens
