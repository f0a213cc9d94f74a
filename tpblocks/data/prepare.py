"""Prepare once: documents -> sentencepiece -> BOS doc EOS stream -> held-out shard + training shards.

``prepare_data(cfg)`` returns a ``PreparedData`` naming the tokenizer and the token shards. The work is done
once per (documents, tokenizer, split options) and cached under ``<cache_dir>/tokens/<key>/``:

    manifest.json      what the directory holds (written last: its presence means "complete")
    stats.json         documents read / skipped empty / skipped invalid, tokens, bytes per token, time
    tokenizer.model    a copy of the tokenizer used, so the directory is self-contained (data.source=shards)
    heldout.bin        the first `heldout_tokens` tokens of the stream (see DataConfig.heldout_tokens)
    train_000000.bin … training tokens, `shard_tokens` per file

The key hashes the source fingerprint, the tokenizer file's sha256 and the split options; ``seq_len``, seeds
and model choices are not in it, so a sweep over architectures, seeds or context lengths tokenises once.
The directory is built under a temporary name and renamed into place, so a crash leaves nothing that looks
complete. The stream is always read in one fixed order by one process: the tokens do not depend on the
world size of the runs that use them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tpblocks.data.config import DataConfig
from tpblocks.data.shards import SHARD_VERSION, ShardError, open_shard, read_header, token_dtype, write_shard
from tpblocks.data.sources import DataError, DocStats, NoDocumentsError, iter_documents, source_fingerprint
from tpblocks.data.tokenizer import TRAINER_VERSION, load_tokenizer, train_tokenizer
from tpblocks.integrity import checksum_listing, file_sha256, find_damage

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the stream layout changes (document delimiters, split rule)
MANIFEST = "manifest.json"
_ENCODE_BATCH = 256  # documents per sentencepiece call (its threads parallelise within a call)


@dataclass(frozen=True, kw_only=True)
class PreparedData:
    """A complete prepared directory: tokenizer + held-out shard + training shards."""

    tokenizer_path: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    train_shards: list[Path]
    heldout_shard: Path
    n_train_tokens: int
    n_heldout_tokens: int = 0
    directory: Path | None = None
    tokenizer_sha256: str = ""
    stats: dict = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------------------------------- keys
def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_cache_path(cfg: DataConfig) -> Path:
    """Where the tokenizer trained for ``cfg`` (tokenizer_path=None) is cached."""
    key = _hash([TRAINER_VERSION, source_fingerprint(cfg), cfg.vocab_size, cfg.tokenizer_train_bytes])
    return cfg.resolved_cache_dir / "tokenizers" / key / "tokenizer.model"


def data_cache_key(cfg: DataConfig, tokenizer_sha256: str) -> str:
    """Cache key of the token shards: documents, tokenizer, split and validation options (every option that
    changes the tokens; not seq_len, not seeds)."""
    return _hash(
        [
            PREPARE_VERSION,
            SHARD_VERSION,
            source_fingerprint(cfg),
            tokenizer_sha256,
            cfg.heldout_tokens,
            cfg.max_train_tokens,
            cfg.shard_tokens,
            cfg.on_invalid,  # "error" must re-read the documents, not reuse shards that skipped bad rows
        ]
    )


# -------------------------------------------------------------------------------------------------- waiting
def _wait_for(path: Path, cfg: DataConfig, rank: int, what: str) -> None:
    """Ranks > 0 never write the cache: they wait for rank 0's result to appear."""
    deadline = time.monotonic() + cfg.prepare_timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(
                f"rank {rank} waited {cfg.prepare_timeout_s:.0f} s for {what} at {path}, which rank 0 prepares. "
                "Did rank 0 fail? With node-local caches call prepare_data with rank=local_rank, or point "
                "data.cache_dir (or $TPBLOCKS_CACHE) at a shared file system"
            )
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ manifest
_MANIFEST_KEYS = ("tokenizer_sha256", "train_shards", "heldout_shard", "vocab_size", "bos_id", "eos_id",
                  "n_train_tokens", "n_heldout_tokens")  # fmt: skip
_VERIFIED = ".verified.json"  # files (name, size, mtime) whose bodies were checked against the manifest


def _read_manifest(directory: Path) -> dict:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise DataError(
            f"{directory} holds no {MANIFEST}: it is not a complete prepared token directory (an interrupted "
            "preparation leaves none); re-run prepare or point data.path at a directory written by prepare_data"
        )
    try:
        m = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{manifest_path} is not valid JSON ({err}); delete {directory} and re-run prepare") from None
    if not isinstance(m, dict) or m.get("format") != "tpblocks-tokens" or m.get("version") != PREPARE_VERSION:
        found = (m.get("format"), m.get("version")) if isinstance(m, dict) else (type(m).__name__, None)
        raise DataError(
            f"{manifest_path} has format {found[0]!r} version {found[1]}, expected tpblocks-tokens "
            f"version {PREPARE_VERSION}; delete {directory} and re-run prepare"
        )
    missing = [k for k in _MANIFEST_KEYS if k not in m]
    if missing:
        raise DataError(
            f"{manifest_path} lacks {missing} (incomplete or edited); delete {directory} and re-run prepare"
        )
    return m


def _file_stamps(directory: Path, names: list[str]) -> dict[str, list[int]]:
    return {n: [(directory / n).stat().st_size, (directory / n).stat().st_mtime_ns] for n in names}


def _max_id(path: Path) -> int:
    """Largest token id in a shard's body (0 for an empty one)."""
    _, tokens = open_shard(path)
    return int(tokens.max()) if tokens.size else 0


def _verify_bodies(directory: Path, m: dict, shards: list[Path]) -> None:
    """Check every shard body against the manifest's sha256 and every id against the vocabulary, once per
    directory state: ``.verified.json`` remembers (size, mtime) of the files that passed, so later reads of an
    unchanged directory cost nothing; a file touched since is checked again."""
    names = [p.name for p in shards]
    marker = directory / _VERIFIED
    stamps = _file_stamps(directory, names)
    try:
        if json.loads(marker.read_text()) == stamps:
            return
    except (OSError, ValueError):
        pass
    checksums = m.get("checksums")
    if isinstance(checksums, dict):
        damage = find_damage(directory, {n: checksums[n] for n in names if n in checksums})
        if damage is not None:
            raise ShardError(
                f"token shards in {directory} are damaged: {damage}; delete {directory} and re-run prepare"
            )
    else:
        log.warning(
            "data: %s lists no checksums (prepared by an older tpblocks): shard bodies are not verified", directory
        )
    for path in shards:
        top = _max_id(path)
        if top >= m["vocab_size"]:
            raise ShardError(
                f"token shard {path} holds id {top}, outside the vocabulary of {m['vocab_size']} tokens: the body is "
                f"corrupt; delete {directory} and re-run prepare"
            )
    try:
        marker.write_text(json.dumps(stamps))
    except OSError:  # a read-only copy of a prepared directory: verified again next time
        pass


def load_prepared(directory: str | Path, verify: bool = True) -> PreparedData:
    """Open a prepared directory and check every shard header against the manifest; with ``verify`` also the
    bodies (sha256 and token ids, see ``_verify_bodies``). Any problem is a DataError naming the file."""
    directory = Path(directory).expanduser()
    m = _read_manifest(directory)
    manifest_path = directory / MANIFEST
    tokenizer = directory / "tokenizer.model"
    if not tokenizer.is_file() or file_sha256(tokenizer) != m["tokenizer_sha256"]:
        raise DataError(
            f"{tokenizer} is missing or is not the tokenizer the shards were written with (sha256 "
            f"{str(m['tokenizer_sha256'])[:12]}…); delete {directory} and re-run prepare"
        )
    train = [directory / name for name in m["train_shards"]]
    heldout = directory / m["heldout_shard"]
    counted = 0
    for path in [*train, heldout]:
        header = read_header(path)
        if header.vocab_size != m["vocab_size"] or header.tokenizer_sha256 != m["tokenizer_sha256"]:
            raise ShardError(
                f"token shard {path} was written for another tokenizer than {manifest_path} describes "
                f"(vocab {header.vocab_size} vs {m['vocab_size']}); delete {directory} and re-run prepare"
            )
        counted += header.n_tokens if path != heldout else 0
    if counted != m["n_train_tokens"]:
        raise ShardError(
            f"training shards in {directory} hold {counted} tokens but {MANIFEST} says {m['n_train_tokens']}; "
            f"delete {directory} and re-run prepare"
        )
    if verify:
        _verify_bodies(directory, m, [*train, heldout])
    stats_path = directory / "stats.json"
    return PreparedData(
        tokenizer_path=tokenizer,
        vocab_size=m["vocab_size"],
        bos_id=m["bos_id"],
        eos_id=m["eos_id"],
        train_shards=train,
        heldout_shard=heldout,
        n_train_tokens=m["n_train_tokens"],
        n_heldout_tokens=m["n_heldout_tokens"],
        directory=directory,
        tokenizer_sha256=m["tokenizer_sha256"],
        stats=json.loads(stats_path.read_text()) if stats_path.is_file() else {},
    )


# ------------------------------------------------------------------------------------------------- writing
class _ShardWriter:
    """Accumulates the training stream and writes a shard every `shard_tokens` tokens."""

    def __init__(self, directory: Path, cfg: DataConfig, vocab: int, bos: int, eos: int, sha: str) -> None:
        self.directory, self.cfg = directory, cfg
        self.meta = dict(vocab_size=vocab, bos_id=bos, eos_id=eos, tokenizer_sha256=sha)
        self.buf = np.empty(cfg.shard_tokens, dtype=token_dtype(vocab))
        self.fill = 0
        self.names: list[str] = []
        self.total = 0

    def add(self, ids: np.ndarray) -> None:
        while ids.size:
            take = min(ids.size, self.buf.size - self.fill)
            self.buf[self.fill : self.fill + take] = ids[:take]
            self.fill += take
            self.total += take
            ids = ids[take:]
            if self.fill == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"train_{len(self.names):06d}.bin"
        write_shard(self.directory / name, self.buf[: self.fill], **self.meta)
        self.names.append(name)
        self.fill = 0


def _tokenise(cfg: DataConfig, tokenizer_path: Path, out_dir: Path) -> dict:
    """Write heldout.bin, train_*.bin, tokenizer.model and stats.json into ``out_dir``; return the manifest."""
    sp, info = load_tokenizer(tokenizer_path)
    shutil.copyfile(info.path, out_dir / "tokenizer.model")
    dtype = token_dtype(info.vocab_size)
    stats = DocStats()
    started = time.monotonic()
    heldout: list[np.ndarray] = []
    n_heldout = heldout_docs = train_docs = used_bytes = 0
    writer = _ShardWriter(out_dir, cfg, info.vocab_size, info.bos_id, info.eos_id, info.sha256)
    cap = cfg.max_train_tokens
    bar = tqdm(
        total=(cfg.heldout_tokens + cap) if cap else None,
        desc=f"tokenising ({cfg.source})",
        unit="tok",
        unit_scale=True,
        disable=None,
    )
    threads = cfg.encode_threads or os.cpu_count() or 1
    done = False
    leftover: np.ndarray | None = None  # the tail of the last held-out document, cut off at heldout_tokens
    docs = iter_documents(cfg, stats)
    while not done:
        batch = [d for _, d in zip(range(_ENCODE_BATCH), docs)]
        if not batch:
            break
        for text, ids in zip(batch, sp.encode(batch, num_threads=threads)):
            # BOS doc EOS: every document starts and ends marked, so the model never attends across an
            # unmarked document boundary and a decoder can split the stream back into documents.
            arr = np.empty(len(ids) + 2, dtype=dtype)
            arr[0], arr[-1] = info.bos_id, info.eos_id
            arr[1:-1] = ids
            used_bytes += len(text.encode("utf-8"))
            if n_heldout < cfg.heldout_tokens:
                cut = cfg.heldout_tokens - n_heldout
                if cut < arr.size:  # the last held-out document is cut, never shared (see `leftover` below)
                    arr, leftover = arr[:cut], arr[cut:]
                heldout.append(arr)
                n_heldout += arr.size
                heldout_docs += 1
            else:
                if cap is not None:
                    arr = arr[: cap - writer.total]
                writer.add(arr)
                train_docs += 1
                done = cap is not None and writer.total >= cap
            bar.update(arr.size)
            if done:
                break
    bar.close()
    if writer.total == 0 and leftover is not None and leftover.size > 1:
        # Every document went to the held-out set and the last one was longer than what was left of it (a corpus
        # of one big document): train on the rest of that document rather than on nothing.
        log.warning(
            "data: the held-out set (data.heldout_tokens=%d) ends inside the last document read; its remaining "
            "%d tokens are the training set (held-out and training tokens then share that one document)",
            cfg.heldout_tokens,
            leftover.size,
        )
        writer.add(leftover[: cap if cap is not None else leftover.size])
    writer.flush()
    if n_heldout < cfg.heldout_tokens or writer.total == 0:
        raise DataError(
            f"the data gave {n_heldout + writer.total} tokens ({stats.docs_used} usable documents of "
            f"{stats.docs_read}), not enough for data.heldout_tokens={cfg.heldout_tokens} plus training tokens; "
            f"lower data.heldout_tokens or give more data{stats.why_nothing()}"
        )
    write_shard(
        out_dir / "heldout.bin",
        np.concatenate(heldout) if heldout else np.zeros(0, dtype),
        vocab_size=info.vocab_size,
        bos_id=info.bos_id,
        eos_id=info.eos_id,
        tokenizer_sha256=info.sha256,
    )
    elapsed = time.monotonic() - started
    total = n_heldout + writer.total
    summary = {
        **stats.to_dict(),
        "heldout_docs": heldout_docs,
        "train_docs": train_docs,
        "n_heldout_tokens": n_heldout,
        "n_train_tokens": writer.total,
        "stopped_at_max_train_tokens": bool(done),
        "bytes_per_token": round(used_bytes / max(total, 1), 4),
        "tokens_per_s": round(total / max(elapsed, 1e-9)),
        "elapsed_s": round(elapsed, 2),
    }
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    if stats.skipped_empty or stats.skipped_invalid:
        log.warning(
            "data: skipped %d empty and %d invalid documents of %d (first invalid: %s); counts in %s",
            stats.skipped_empty,
            stats.skipped_invalid,
            stats.docs_read,
            stats.first_invalid,
            out_dir.name + "/stats.json",
        )
    return {
        "format": "tpblocks-tokens",
        "version": PREPARE_VERSION,
        "vocab_size": info.vocab_size,
        "bos_id": info.bos_id,
        "eos_id": info.eos_id,
        "tokenizer_sha256": info.sha256,
        "tokenizer_source": str(info.path),
        "train_shards": writer.names,
        "heldout_shard": "heldout.bin",
        "n_train_tokens": writer.total,
        "n_heldout_tokens": n_heldout,
        "source": source_fingerprint(cfg),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("seq_len", "seed", "shuffle")},
        "checksums": checksum_listing(out_dir, [*writer.names, "heldout.bin", "tokenizer.model"]),
    }


# ------------------------------------------------------------------------------------------------- public
def resolve_tokenizer(cfg: DataConfig, rank: int = 0) -> Path:
    """The tokenizer file for ``cfg``: the given one, or the cached one trained on the data (rank 0 trains)."""
    if cfg.tokenizer_path:
        path = Path(cfg.tokenizer_path).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.tokenizer_path={cfg.tokenizer_path} does not exist; give a sentencepiece .model file "
                "(e.g. the Llama-2 tokenizer.model) or data.tokenizer_path=null to train one on the data"
            )
        return path
    path = tokenizer_cache_path(cfg)
    if path.is_file():
        return path
    if rank != 0:
        _wait_for(path, cfg, rank, "the trained tokenizer")
        return path
    log.info("data: training a %d-piece BPE tokenizer on %s data -> %s", cfg.vocab_size, cfg.source, path)
    stats = DocStats()
    try:
        return train_tokenizer(
            iter_documents(cfg, stats),
            path,
            vocab_size=cfg.vocab_size,
            max_bytes=cfg.tokenizer_train_bytes,
            threads=cfg.encode_threads,
        )
    except NoDocumentsError as err:
        raise NoDocumentsError(f"{err}{stats.why_nothing()}") from None


def prepare_data(cfg: DataConfig, rank: int = 0, world: int = 1) -> PreparedData:
    """Tokenizer + token shards for ``cfg``, built once and cached (idempotent).

    Rank 0 does the work; other ranks only read the cache, waiting for rank 0's result (up to
    ``cfg.prepare_timeout_s``) if it is not there yet. Callers usually run rank 0 first and barrier. ``world`` is
    accepted for symmetry: the prepared stream is the same for every world size.
    """
    del world  # the stream is world-size independent by design
    # Local rank 0 verifies the shard bodies (once per directory state); the other ranks read headers only.
    if cfg.source == "shards":
        return load_prepared(cfg.path, verify=rank == 0)
    tokenizer_path = resolve_tokenizer(cfg, rank)
    key = data_cache_key(cfg, file_sha256(tokenizer_path))
    final = cfg.resolved_cache_dir / "tokens" / key
    if (final / MANIFEST).is_file():
        return load_prepared(final, verify=rank == 0)
    if rank != 0:
        _wait_for(final / MANIFEST, cfg, rank, "the prepared token shards")
        return load_prepared(final, verify=False)
    if cfg.source == "hub" and cfg.max_train_tokens is None:
        log.warning(
            "data: no data.max_train_tokens for hub dataset %s: tokenising the whole subset (can be billions of "
            "tokens); set data.max_train_tokens to what the run needs",
            cfg.hub_name,
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _tokenise(cfg, tokenizer_path, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists() and not (final / MANIFEST).is_file():
            shutil.rmtree(final)  # an incomplete directory left by hand or an old version: replace it
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same preparation first: keep theirs
            if not (final / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(final)
