"""Document sources: the embedded corpus, local parquet/jsonl/txt files and Hugging Face hub datasets.

Every source yields plain ``str`` documents in a fixed order and counts what it had to drop in a
``DocStats``. Bad rows never pass silently:

* empty or whitespace-only documents (and nulls) are skipped and counted (``skipped_empty``);
* invalid UTF-8 (raw bytes in a jsonl line, a binary parquet column, a string with lone surrogates) and
  malformed jsonl lines are counted (``skipped_invalid``) and skipped, or stop the run with the file and line
  when ``on_invalid="error"``;
* a missing text column stops the run with the columns that were found;
* an unreachable hub stops the run with the command that points at local files instead.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tpblocks.data.config import DataConfig
from tpblocks.data.embedded import build_embedded_corpus, embedded_cache_key

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt")


class DataError(ValueError):
    """Bad data or an unreachable data source, with a message saying what to do."""


class NoDocumentsError(DataError):
    """A pass over the source yielded no usable text (``DocStats.why_nothing`` says why)."""


class HubUnavailableError(DataError):
    """The Hugging Face hub could not be reached (offline mode or no network)."""


@dataclass
class DocStats:
    """What a pass over a source read and dropped (written to ``stats.json`` beside the shards)."""

    docs_read: int = 0
    docs_used: int = 0
    skipped_empty: int = 0
    skipped_invalid: int = 0
    first_invalid: str | None = None  # "file:line: reason" of the first skipped invalid row

    def to_dict(self) -> dict:
        return asdict(self)

    def why_nothing(self) -> str:
        """Why a pass yielded no usable document (for "not enough data" messages); "" when some were usable."""
        if self.docs_used:
            return ""
        if self.skipped_invalid:
            return (
                f"; all {self.docs_read} documents read were invalid or empty ({self.skipped_invalid} invalid), "
                f"the first invalid: {self.first_invalid}"
            )
        if self.docs_read:
            return f"; all {self.docs_read} documents read were empty"
        return "; the source holds no documents"


# ----------------------------------------------------------------------------------------------------- local
def resolve_local_files(path: str) -> list[Path]:
    """Expand ``path`` (file, directory or glob) into a sorted list of supported data files."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(LOCAL_SUFFIXES))
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise DataError(
            f"data.path={path!r} matches no files; give a parquet/jsonl/txt file, a directory holding them, or a "
            f"glob such as /data/fineweb/*.parquet"
        )
    bad = [f for f in files if not f.name.endswith(LOCAL_SUFFIXES)]
    if bad:
        raise DataError(f"unsupported data file {bad[0]} (supported endings: {', '.join(LOCAL_SUFFIXES)})")
    return files


def _invalid(stats: DocStats, cfg: DataConfig, where: str, reason: str) -> None:
    if cfg.on_invalid == "error":
        raise DataError(f"{where}: {reason}; fix the file or set data.on_invalid=skip to count and skip such rows")
    stats.skipped_invalid += 1
    if stats.first_invalid is None:
        stats.first_invalid = f"{where}: {reason}"


def _text_or_none(value: object, stats: DocStats, cfg: DataConfig, where: str) -> str | None:
    """Validate one document value; returns the text or None when it was skipped (and counted)."""
    stats.docs_read += 1
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            _invalid(stats, cfg, where, f"invalid UTF-8 ({e.reason} at byte {e.start})")
            return None
    if value is None:
        stats.skipped_empty += 1
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {cfg.text_field!r} holds {type(value).__name__}, not text; set data.text_field to "
            "the column that holds the documents"
        )
    try:
        value.encode("utf-8")  # lone surrogates (e.g. a jsonl "\ud800" escape) are not encodable text
    except UnicodeEncodeError as e:
        _invalid(stats, cfg, where, f"text is not valid Unicode ({e.reason})")
        return None
    if not value.strip():
        stats.skipped_empty += 1
        return None
    stats.docs_used += 1
    return value


def _iter_parquet(path: Path, cfg: DataConfig, stats: DocStats) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise DataError(
            f"parquet file {path} has no column {cfg.text_field!r}; its columns are {names}. "
            f"Set data.text_field to the one holding the documents"
        )
    ftype = pf.schema_arrow.field(cfg.text_field).type
    if not (
        pa.types.is_string(ftype)
        or pa.types.is_large_string(ftype)
        or pa.types.is_binary(ftype)
        or pa.types.is_large_binary(ftype)
    ):
        raise DataError(f"parquet column {cfg.text_field!r} of {path} has type {ftype}, not text")
    row = 0
    for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
        column = batch.column(0)
        # Read as bytes and decode ourselves: Arrow does not re-validate UTF-8 of string columns on read, and a
        # binary column may hold anything; decoding here turns bad bytes into a counted skip, not mojibake.
        column = column.cast(pa.large_binary()) if not pa.types.is_large_binary(column.type) else column
        for value in column.to_pylist():
            text = _text_or_none(value, stats, cfg, f"{path} row {row}")
            row += 1
            if text is not None:
                yield text


def _iter_json_array(path: Path, cfg: DataConfig, stats: DocStats) -> Iterator[str]:
    """A ``.json`` file holding one JSON array of ``{text_field: ...}`` objects (pretty-printed exports)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            rows = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            stats.docs_read += 1
            _invalid(stats, cfg, str(path), f"not a valid JSON array ({e})")
            return
    for i, obj in enumerate(rows):
        if not isinstance(obj, dict) or cfg.text_field not in obj:
            raise DataError(f"{path} item {i}: each item of the JSON array must be an object with a "
                            f"{cfg.text_field!r} field; set data.text_field")  # fmt: skip
        text = _text_or_none(obj[cfg.text_field], stats, cfg, f"{path} item {i}")
        if text is not None:
            yield text


def _starts_with_bracket(path: Path) -> bool:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def _iter_jsonl(path: Path, cfg: DataConfig, stats: DocStats) -> Iterator[str]:
    if path.name.endswith((".json", ".json.gz")) and _starts_with_bracket(path):
        yield from _iter_json_array(path, cfg, stats)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.docs_read += 1
                _invalid(stats, cfg, where, f"invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.docs_read += 1
                hint = "; one JSON object per line, or a .json file holding one array" if lineno == 1 else ""
                _invalid(stats, cfg, where, f"malformed JSON ({e.msg}){hint}")
                continue
            if not isinstance(obj, dict):
                raise DataError(f"{where}: each jsonl line must be an object with a {cfg.text_field!r} field")
            if cfg.text_field not in obj:
                raise DataError(
                    f"{where}: no field {cfg.text_field!r}; the fields found are {sorted(obj)}. Set data.text_field"
                )
            text = _text_or_none(obj[cfg.text_field], stats, cfg, where)
            if text is not None:
                yield text


def _iter_txt(path: Path, cfg: DataConfig, stats: DocStats) -> Iterator[str]:
    text = _text_or_none(path.read_bytes(), stats, cfg, str(path))
    if text is not None:
        yield text


def iter_local_documents(files: Iterable[Path], cfg: DataConfig, stats: DocStats) -> Iterator[str]:
    for path in files:
        if path.name.endswith(".parquet"):
            yield from _iter_parquet(path, cfg, stats)
        elif path.name.endswith(".txt"):
            yield from _iter_txt(path, cfg, stats)
        else:
            yield from _iter_jsonl(path, cfg, stats)


# ------------------------------------------------------------------------------------------------------- hub
def _hub_hint(cfg: DataConfig, reason: str) -> str:
    subset = f" ({cfg.hub_subset})" if cfg.hub_subset else ""
    return (
        f"cannot reach the Hugging Face hub for dataset {cfg.hub_name}{subset}: {reason}. Train on local files "
        f"instead: data.source=local data.path=/path/to/*.parquet (e.g. FineWeb-Edu parquet files downloaded "
        f"elsewhere), or on the built-in offline corpus with data=embedded"
    )


def _is_offline_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    return any(k in name for k in ("Offline", "Connection", "Timeout", "LocalEntryNotFound", "HTTPError"))


def iter_hub_documents(cfg: DataConfig, stats: DocStats, rank: int = 0, world: int = 1) -> Iterator[str]:
    """Stream documents from the hub. With ``world > 1`` each rank gets a disjoint part (split_dataset_by_node)."""
    offline_vars = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
    try:
        import datasets

        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_subset, split=cfg.hub_split, streaming=cfg.streaming)
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        iterator = iter(ds)
        first = next(iterator, None)
    except Exception as e:  # noqa: BLE001 - every failure to open the stream gets the same actionable message
        if isinstance(e, DataError):
            raise
        if _is_offline_error(e) or offline_vars or isinstance(e, OSError):
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
            if offline_vars:
                reason += f" ({' and '.join(offline_vars)} {'are' if len(offline_vars) > 1 else 'is'} set)"
            raise HubUnavailableError(_hub_hint(cfg, reason)) from None
        raise DataError(
            f"cannot open hub dataset {cfg.hub_name} subset={cfg.hub_subset}: {type(e).__name__}: {e}"
        ) from None
    if first is None:
        return
    if cfg.text_field not in first:
        raise DataError(
            f"hub dataset {cfg.hub_name} has no field {cfg.text_field!r}; its fields are {sorted(first)}. "
            "Set data.text_field"
        )
    index = 0
    row = first
    while row is not None:
        text = _text_or_none(row.get(cfg.text_field), stats, cfg, f"{cfg.hub_name} row {index}")
        if text is not None:
            yield text
        index += 1
        try:
            row = next(iterator, None)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise HubUnavailableError(
                _hub_hint(cfg, f"the stream broke after {index} rows ({type(e).__name__})")
            ) from None


# ---------------------------------------------------------------------------------------------------- facade
def iter_documents(cfg: DataConfig, stats: DocStats | None = None, rank: int = 0, world: int = 1) -> Iterator[str]:
    """Documents of ``cfg``'s source in their fixed order (rank ``rank`` of ``world`` gets a disjoint part).

    The prepare-once path always reads with ``rank=0, world=1`` so the token stream does not depend on how many
    processes train on it; the split is for streaming directly from the hub without shards.
    """
    stats = stats if stats is not None else DocStats()
    if cfg.source == "hub":
        yield from iter_hub_documents(cfg, stats, rank, world)
        return
    if cfg.source == "embedded":
        files = [build_embedded_corpus(cfg.resolved_cache_dir)]
        cfg = cfg.replace(text_field="text")
    elif cfg.source == "local":
        files = resolve_local_files(cfg.path)
    else:
        raise DataError(f"data.source={cfg.source} holds prepared shards, not documents")
    for i, doc in enumerate(iter_local_documents(files, cfg, stats)):
        if i % world == rank:
            yield doc


def source_fingerprint(cfg: DataConfig) -> dict:
    """What identifies the documents of ``cfg`` for cache keys (files by name, size and mtime)."""
    if cfg.source == "embedded":
        return {"source": "embedded", "corpus": embedded_cache_key()}
    if cfg.source == "local":
        files = resolve_local_files(cfg.path)
        listing = [(str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        return {"source": "local", "files": digest, "n_files": len(files), "text_field": cfg.text_field}
    if cfg.source == "hub":
        return {
            "source": "hub",
            "name": cfg.hub_name,
            "subset": cfg.hub_subset,
            "split": cfg.hub_split,
            "text_field": cfg.text_field,
        }
    raise DataError(f"data.source={cfg.source} has no document fingerprint")
