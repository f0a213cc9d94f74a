"""Local text and tokenizers for post-hoc evaluation: bytes, SentencePiece, or a Hugging Face tokenizer.

All three expose the same small protocol (``encode``, ``decode``, ``vocab_size``, ``bos_id``, ``eos_id``) so
perplexity, the lm-eval adapter and LoRA recovery work with any of them. The byte tokenizer needs no file and is
what the tiny demo Llama (``tiny.py``) is trained with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256, no special tokens): exact round trip, no file needed."""

    vocab_size = 256
    bos_id = None
    eos_id = None
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (e.g. the Llama-2 tokenizer)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.name = f"sentencepiece:{Path(path).name}"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A ``transformers`` tokenizer from a local directory (no special tokens are added by ``encode``)."""

    def __init__(self, directory: str | os.PathLike):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(directory))
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.name = f"hf:{Path(directory).name}"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``"bytes"``, a SentencePiece ``.model`` file, or a directory holding a Hugging Face tokenizer."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir() and any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return HFTokenizer(path)
    raise ValueError(
        f"tokenizer {str(spec)!r} not understood: use 'bytes', a SentencePiece .model file, or a directory with "
        f"tokenizer.json / tokenizer_config.json (a Hugging Face tokenizer saved with save_pretrained)"
    )


def read_text(path: str | os.PathLike) -> str:
    """A local text file with Windows/old-Mac line endings normalised to ``\\n`` (WikiText raw files are CRLF)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_text(text: str, heldout_fraction: float = 0.1) -> tuple[str, str]:
    """(train, heldout): the last ``heldout_fraction`` of the text, cut at a line boundary."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must lie strictly between 0 and 1")
    cut = int(len(text) * (1.0 - heldout_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "read_text",
    "split_text",
]
