"""Parallelise a pre-trained Llama post hoc and print the comparison table (docs/posthoc.md).

    python launch/posthoc.py                                  # tiny byte-level Llama trained on WikiText-2 (cached)
    python launch/posthoc.py --quick                          # fewer tokens and steps everywhere
    python launch/posthoc.py --checkpoint DIR --tokenizer DIR # any local LlamaForCausalLM / MistralForCausalLM
    python launch/posthoc.py --range 2 6 --lp-ranges 3:5,2:6,1:7 --lora 7,15,lp2:6 --json out.json

Rows: the base model, the 16 configurations of Table 1 (Scotti & Carman) over ``--range``, and Layer
Parallelism over each ``--lp-ranges`` entry. Columns: held-out perplexity (strided window), its change, effective
depth, syncs per decoded token (blocking all-reduces of a 2-way tensor-parallel run, counted by the model's
Communicator during a real KV-cache decode), measured decode ms/token in this process, and — for ``--lora``
rows — perplexity after LoRA recovery on the training part of the text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from tpblocks.posthoc.checkpoint import load_llama_family  # noqa: E402
from tpblocks.posthoc.lora import LoraConfig  # noqa: E402
from tpblocks.posthoc.table import TableSpec, format_rows, run_table  # noqa: E402
from tpblocks.posthoc.text import load_tokenizer, read_text, split_text  # noqa: E402
from tpblocks.posthoc.tiny import tiny_wikitext_llama  # noqa: E402

DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in filter(None, text.split(",")):
        try:
            s, e = part.split(":")
            out.append((int(s), int(e)))
        except ValueError:
            raise SystemExit(f"--lp-ranges entry {part!r} must look like START:END (e.g. 2:6)") from None
    return tuple(out)


def _lora_rows(text: str) -> tuple[str, ...]:
    """``7,15,lp2:6`` -> ("cfg7", "cfg15", "LP[2,6)")."""
    rows = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        if part == "base":
            rows.append("base")
        elif part.startswith("lp"):
            ((s, e),) = _ranges(part[2:])
            rows.append(f"LP[{s},{e})")
        else:
            rows.append(f"cfg{part.removeprefix('cfg')}")
    return tuple(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="local HF Llama/Mistral directory (default: the tiny WikiText Llama)")
    p.add_argument("--tokenizer", default=None, help="'bytes', a SentencePiece .model, or a HF tokenizer directory")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="local text file (CRLF normalised)")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="tail of the text used for evaluation")
    p.add_argument("--cache-dir", default=str(REPO / "outputs" / "posthoc" / "tiny_wikitext_llama"))
    p.add_argument("--train-steps", type=int, default=400, help="steps for the tiny Llama when it is not cached")
    p.add_argument("--range", nargs=2, type=int, metavar=("START", "END"), help="Table-1 layer range")
    p.add_argument("--configs", default="1-16", help="Table-1 IDs, e.g. 1-16 or 3,7,15")
    p.add_argument("--lp-ranges", default=None, help="Layer-Parallelism ranges, e.g. 3:5,2:6,1:7")
    p.add_argument(
        "--lora", default="base,7,15", help="rows to LoRA-tune: 'base' (control), Table-1 IDs, lpSTART:END ('' = none)"
    )
    p.add_argument("--lora-steps", type=int, default=150)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="fewer eval tokens and training/LoRA steps")
    p.add_argument("--distributed", action="store_true", help="also time TP vs LP decode on 2 gloo ranks")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    if args.quick:
        args.eval_tokens, args.lora_steps, args.train_steps = 6_000, 60, min(args.train_steps, 200)
        args.decode_tokens = 16
    text = read_text(args.text)
    train_text, eval_text = split_text(text, args.heldout_fraction)
    if args.checkpoint:
        model = load_llama_family(args.checkpoint)
        tok_spec = args.tokenizer or args.checkpoint
    else:
        model = tiny_wikitext_llama(train_text, args.cache_dir, steps=args.train_steps)
        tok_spec = args.tokenizer or "bytes"
    tok = load_tokenizer(tok_spec)
    if tok.vocab_size > model.cfg.vocab_size:
        raise SystemExit(f"tokenizer vocab {tok.vocab_size} > model vocab {model.cfg.vocab_size}: wrong --tokenizer?")
    n = len(model.stages)
    start, end = args.range or ((n - 4) // 2, (n - 4) // 2 + 4)
    lp_ranges = _ranges(args.lp_ranges) if args.lp_ranges is not None else _default_lp_ranges(n)
    configs = _config_ids(args.configs)
    spec = TableSpec(
        start=start,
        end=end,
        configs=configs,
        lp_ranges=lp_ranges,
        window=min(args.window, model.cfg.max_seq_len),
        stride=args.stride,
        eval_tokens=args.eval_tokens,
        decode_tokens=args.decode_tokens,
        lora_rows=_lora_rows(args.lora),
        lora=LoraConfig(steps=args.lora_steps),
    )
    eval_ids = torch.tensor(tok.encode(eval_text), dtype=torch.long)
    train_ids = torch.tensor(tok.encode(train_text[:2_000_000]), dtype=torch.long)
    results = run_table(model, eval_ids, spec, train_ids=train_ids)
    info = machine_info()
    title = (
        f"post-hoc parallelisation: {n}-layer Llama ({model.num_parameters() / 1e6:.2f}M params), "
        f"{min(len(eval_ids), spec.eval_tokens)} held-out tokens, window {spec.window}/stride {spec.stride}; "
        f"machine: {info['processor']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"
    )
    print_table(format_rows(results), title=title)
    print("syncs/tok: blocking all-reduces per decoded token of a 2-way tensor-parallel run of the same schedule;")
    print("ms/tok: measured single-process decode step (both pair/group members computed here, so no LP speed-up).")
    dist_rows = []
    if args.distributed:
        from tpblocks.posthoc.lp_latency import measure_lp_latency

        dist_rows = measure_lp_latency(
            args.checkpoint or args.cache_dir, lp_ranges, eval_ids[:32].tolist(), new_tokens=args.decode_tokens
        )
        tp_ms = dist_rows[0]["ms_per_token_2rank"]
        for r in dist_rows:
            r["speedup_vs_tp"] = tp_ms / r["ms_per_token_2rank"]
        print_table(
            [
                {
                    "schedule": r["row"],
                    "syncs/tok": f"{r['syncs_per_token']:.0f}",
                    "ms/tok (2 ranks)": f"{r['ms_per_token_2rank']:.2f}",
                    "speed-up vs TP": f"{r['speedup_vs_tp']:.2f}x",
                }
                for r in dist_rows
            ],
            title="2-rank decode, gloo on this host: TP = every layer Megatron-sharded; LP = pairs on separate ranks",
        )
    if args.json:
        write_json(args.json, {"machine": info, "spec": repr(spec), "rows": results, "two_rank_decode": dist_rows})


def _default_lp_ranges(n: int) -> tuple[tuple[int, int], ...]:
    mid = n // 2
    out = [(mid - 1, mid + 1), (mid - 2, mid + 2), (max(0, mid - 3), min(n, mid + 3))]
    return tuple(
        sorted({r for r in out if r[0] >= 0 and r[1] <= n and (r[1] - r[0]) % 2 == 0}, key=lambda r: r[1] - r[0])
    )


def _config_ids(text: str) -> tuple[int, ...]:
    ids: list[int] = []
    for part in filter(None, text.split(",")):
        if "-" in part:
            a, b = part.split("-")
            ids.extend(range(int(a), int(b) + 1))
        else:
            ids.append(int(part))
    return tuple(ids)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # bad arguments or files: a message, no traceback
        raise SystemExit(f"posthoc: {err}") from None
