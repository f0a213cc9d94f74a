"""Train a BPE sentencepiece tokenizer on a data source and report its vocabulary size and bytes per token.

Examples::

    python launch/train_tokenizer.py --source local --path ../shared/data/fineweb_sample --vocab-size 32000 \
        --out tokenizers/fineweb_32k.model
    python launch/train_tokenizer.py --source embedded --vocab-size 4096 --out /tmp/pydocs_4k.model
    python launch/train_tokenizer.py --source hub --hub-subset sample-10BT --max-bytes 500000000 --out fw.model

Then train with it: ``python launch/train.py data.tokenizer_path=tokenizers/fineweb_32k.model ...``.
Bytes per token are measured on documents the tokenizer was not trained on (the ones after the training
sample) when there are any, else on the training sample itself (said in the output).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without `pip install -e .`

from tpblocks.data import DataConfig, DataError, DocStats, bytes_per_token, iter_documents, load_tokenizer  # noqa: E402
from tpblocks.data import train_tokenizer as train_spm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("embedded", "local", "hub"), default="local")
    p.add_argument("--path", help="local: parquet/jsonl/txt file, directory or glob")
    p.add_argument("--hub-name", default="HuggingFaceFW/fineweb-edu")
    p.add_argument("--hub-subset", default="sample-10BT")
    p.add_argument("--text-field", default="text")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-bytes", type=int, default=100_000_000, help="UTF-8 bytes of text to train on")
    p.add_argument("--eval-docs", type=int, default=200, help="documents after the sample used for bytes/token")
    p.add_argument("--out", required=True, help="output .model path")
    p.add_argument("--cache-dir", default=None, help="cache (embedded corpus); default $TPBLOCKS_CACHE or ~/.cache")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.out.endswith(".model"):
        print(f"error: --out {args.out} must end with .model", file=sys.stderr)
        return 2
    try:
        cfg = DataConfig(
            source=args.source,
            path=args.path,
            hub_name=args.hub_name,
            hub_subset=args.hub_subset or None,
            text_field=args.text_field,
            vocab_size=args.vocab_size,
            tokenizer_train_bytes=args.max_bytes,
            cache_dir=args.cache_dir,
        )
        stats = DocStats()
        docs = iter_documents(cfg, stats)
        sample: list[str] = []
        seen = 0
        for doc in docs:  # the documents the trainer will read, up to the byte budget
            sample.append(doc)
            seen += len(doc.encode("utf-8"))
            if seen >= args.max_bytes:
                break
        unseen = list(itertools.islice(docs, args.eval_docs))
        started = time.monotonic()
        out = train_spm(sample, args.out, vocab_size=args.vocab_size, max_bytes=args.max_bytes)
        elapsed = time.monotonic() - started
        sp, info = load_tokenizer(out)
        bpt = bytes_per_token(sp, unseen or sample[: args.eval_docs])
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    where = f"{len(unseen)} held-back documents" if unseen else "training documents (no held-back ones left)"
    print(f"tokenizer      {out}")
    print(f"vocab size     {info.vocab_size} (bos={info.bos_id}, eos={info.eos_id}, byte fallback)")
    print(f"trained on     {len(sample)} documents, {seen / 1e6:.2f} MB, in {elapsed:.1f} s")
    print(f"skipped        {stats.skipped_empty} empty, {stats.skipped_invalid} invalid of {stats.docs_read} read")
    print(f"bytes/token    {bpt:.3f} on {where}")
    print(f"sha256         {info.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
