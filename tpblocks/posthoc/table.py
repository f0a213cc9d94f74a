"""The post-hoc comparison table: base model, the 16 Table-1 configurations and Layer-Parallelism ranges.

For each row: perplexity on held-out text, relative change, effective depth, syncs per decoded token (counted by
the ``Communicator`` during a real KV-cache decode: the blocking all-reduces a 2-way tensor-parallel run of the
same schedule makes) and the measured decode step time in this process. Optionally a LoRA recovery run for
selected rows (perplexity after). ``launch/posthoc.py`` is the command-line front end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from tpblocks.models.model import TransformerLM

from .eval import measure_decode, perplexity
from .layer_pairs import LayerPairConfig, apply_layer_pairs
from .lora import LoraConfig, recover_with_lora
from .parallelise import TABLE1, config_by_name, effective_depth, parallelise


@dataclass(frozen=True, kw_only=True)
class TableSpec:
    """What to put in the table. ``start``/``end`` is the Table-1 range; ``lp_ranges`` the LP rows."""

    start: int
    end: int
    configs: tuple[int, ...] = tuple(TABLE1)
    lp_ranges: tuple[tuple[int, int], ...] = ()
    window: int = 256
    stride: int = 128
    eval_tokens: int = 20_000
    prompt_tokens: int = 32
    decode_tokens: int = 32
    lora_rows: tuple[str, ...] = ()  # row names ("cfg7", "LP[2,6)") that get a LoRA recovery run
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if (self.end - self.start) % 4:
            raise ValueError(
                f"Table-1 range [start={self.start}, end={self.end}) must hold a multiple of 4 layers so that both "
                f"rate 2 and rate 4 apply; e.g. end={self.start + 4 * max(1, (self.end - self.start) // 4)}"
            )
        for c in self.configs:
            config_by_name(c)
        for s, e in self.lp_ranges:
            LayerPairConfig(start=s, end=e)


def build_rows(model: TransformerLM, spec: TableSpec) -> list[tuple[str, dict, TransformerLM]]:
    """(row name, description, transformed model) for every row, base first."""
    n = len(model.stages)
    if spec.end > n:
        raise ValueError(f"range end={spec.end} exceeds the model's {n} layers")
    rows = [("base", {"kind": "base", "depth": n}, model)]
    for cid in spec.configs:
        cfg = config_by_name(cid)
        desc = {
            "kind": "table1",
            "id": cfg.table1_id,
            "config": cfg.name,
            "range": f"[{spec.start},{spec.end})",
            "depth": effective_depth(n, cfg, spec.start, spec.end),
        }
        rows.append((f"cfg{cfg.table1_id}", desc, parallelise(model, cfg, spec.start, spec.end)))
    for s, e in spec.lp_ranges:
        lp = LayerPairConfig(start=s, end=e)
        desc = {"kind": "layer_pairs", "config": lp.name, "range": f"[{s},{e})", "depth": n - lp.n_pairs}
        rows.append((lp.name, desc, apply_layer_pairs(model, lp)))
    return rows


def run_table(
    model: TransformerLM,
    eval_ids: torch.Tensor,
    spec: TableSpec,
    train_ids: torch.Tensor | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate every row of ``spec`` on ``eval_ids`` (and LoRA-recover the requested rows on ``train_ids``)."""
    eval_ids = eval_ids[: spec.eval_tokens]
    prompt = eval_ids[: spec.prompt_tokens]
    results = []
    base_ppl = None
    rows = build_rows(model, spec)
    known = {name for name, _, _ in rows}
    unknown = set(spec.lora_rows) - known
    if unknown:
        raise ValueError(f"lora_rows {sorted(unknown)} are not rows of this table; rows are {sorted(known)}")
    if spec.lora_rows and train_ids is None:
        raise ValueError("LoRA recovery needs train_ids (text to fine-tune on)")
    for name, desc, m in tqdm(rows, desc="rows", disable=not progress):
        ppl = perplexity(m, eval_ids, window=spec.window, stride=spec.stride).ppl
        base_ppl = ppl if base_ppl is None else base_ppl
        m.comm.counter.reset()
        dec = measure_decode(m, prompt, new_tokens=spec.decode_tokens, repeats=2)
        row = {
            "row": name,
            **desc,
            "ppl": ppl,
            "ppl_change_pct": 100.0 * (ppl / base_ppl - 1.0),
            "syncs_per_token": dec.syncs_per_token,
            "decode_ms_per_token": dec.ms_per_token,
        }
        if name in spec.lora_rows:
            tuned = copy.deepcopy(m)
            losses = recover_with_lora(tuned, train_ids, spec.lora, progress=progress)
            row["ppl_after_lora"] = perplexity(tuned, eval_ids, window=spec.window, stride=spec.stride).ppl
            row["lora_final_train_loss"] = sum(losses[-10:]) / len(losses[-10:])
        results.append(row)
    return results


def format_rows(results: list[dict]) -> list[dict]:
    """Rows of strings for a printed table (same order)."""
    out = []
    for r in results:
        out.append(
            {
                "row": r["row"],
                "config": r.get("config", "-"),
                "range": r.get("range", "-"),
                "depth": r["depth"],
                "ppl": f"{r['ppl']:.3f}",
                "d_ppl%": f"{r['ppl_change_pct']:+.1f}",
                "syncs/tok": f"{r['syncs_per_token']:.0f}",
                "ms/tok": f"{r['decode_ms_per_token']:.2f}",
                "ppl+LoRA": f"{r['ppl_after_lora']:.3f}" if "ppl_after_lora" in r else "",
            }
        )
    return out


__all__ = ["TableSpec", "build_rows", "format_rows", "run_table"]
