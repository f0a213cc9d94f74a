"""sentencepiece tokenizers: load a given ``.model`` (e.g. Llama-2 32k) or train a BPE one on the data.

A trained tokenizer follows the Llama-2 conventions so both kinds behave the same downstream: BPE,
``byte_fallback`` (any UTF-8 text round-trips, nothing maps to ``<unk>``), ids unk=0 / bos=1 / eos=2, no pad,
identity normalisation and kept whitespace (code indentation survives), digits split. Documents are fed
line by line, as sentencepiece expects sentences; newlines are then encoded through byte fallback, as in
Llama-2.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from tqdm.auto import tqdm

from tpblocks.data.sources import DataError, NoDocumentsError
from tpblocks.integrity import file_sha256

TRAINER_VERSION = 1  # bump when the training options below change, so cached tokenizers rebuild
MAX_SENTENCE_BYTES = 16384  # longer lines are skipped by sentencepiece's trainer; we cut them instead


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """A loaded tokenizer file and the ids the token stream uses."""

    path: Path
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int


def load_tokenizer(path: str | Path) -> tuple[spm.SentencePieceProcessor, TokenizerInfo]:
    """Load a sentencepiece model and check it can delimit documents (needs BOS and EOS pieces)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"tokenizer file {path} does not exist; set data.tokenizer_path to a sentencepiece .model file "
            "(e.g. the Llama-2 tokenizer.model) or to null to train one on the data"
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path} is not a readable sentencepiece model: {e}") from None
    bos, eos = sp.bos_id(), sp.eos_id()
    if bos < 0 or eos < 0:
        raise DataError(
            f"tokenizer {path} has no BOS/EOS piece (bos_id={bos}, eos_id={eos}); documents are delimited by "
            "BOS ... EOS, so use a model trained with bos_id/eos_id set (or data.tokenizer_path=null)"
        )
    info = TokenizerInfo(path=path, sha256=file_sha256(path), vocab_size=sp.vocab_size(), bos_id=bos, eos_id=eos)
    return sp, info


def _sentences(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Lines of the documents until ``max_bytes`` of text were given (long lines cut to the trainer limit)."""
    seen = 0
    bar = tqdm(total=max_bytes, desc="tokenizer sample", unit="B", unit_scale=True, disable=None)
    try:
        for doc in documents:
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                data = line.encode("utf-8")
                if len(data) > MAX_SENTENCE_BYTES:
                    line = data[:MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")
                yield line
                seen += len(data) + 1
                bar.update(len(data) + 1)
                if seen >= max_bytes:
                    return
    finally:
        bar.close()


def train_tokenizer(
    documents: Iterable[str],
    out_path: str | Path,
    *,
    vocab_size: int,
    max_bytes: int = 100_000_000,
    threads: int | None = None,
) -> Path:
    """Train a BPE sentencepiece model on ``documents`` and write it atomically to ``out_path``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".spm-", dir=out_path.parent))
    try:
        sentences = list(_sentences(documents, max_bytes))
        if not sentences:
            raise NoDocumentsError("no text to train a tokenizer on: every document was empty or skipped")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(tmpdir / "spm"),
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                character_coverage=0.9995,  # rare characters go through byte fallback instead of eating the vocab
                split_digits=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                input_sentence_size=0,
                max_sentence_length=MAX_SENTENCE_BYTES,
                num_threads=threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e)
            if "Vocabulary size" in msg or "vocab_size" in msg:
                raise DataError(
                    f"cannot train a {vocab_size}-piece tokenizer on this data ({msg.strip()}); lower data.vocab_size"
                ) from None
            raise
        os.replace(tmpdir / "spm.model", out_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out_path


def bytes_per_token(sp: spm.SentencePieceProcessor, documents: Iterable[str]) -> float:
    """UTF-8 bytes per token over ``documents`` (the compression a tokenizer achieves)."""
    docs = list(documents)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(ids) for ids in sp.encode(docs))
    return n_bytes / max(n_tokens, 1)
