"""bf16 training step on one GPU: tokens/s and MFU of the Llama 135M against the parameter-matched Burger-8 and
Sandwich-8, with the Triton kernels, with the pure-torch reference, and with ``torch.compile`` (of the reference).

The step is ``benchmarks/train_step.py``'s ``step_fn`` with the trainer's bf16 (autocast forward, fp32 master
weights, fp32 loss) and a fused AdamW step. The lane models are sized as that benchmark's "(6.7 rule)" rows:
8 lanes, one TP block + one classic layer, the lane depth whose aspect ratio (lane width / depth) is nearest
the report's §6.7 (400 Burger, 100 Sandwich), hidden size solved to the Llama's count (within 1 %).
MFU = tokens/s x ``training_flops_per_token`` / the H200's dense bf16 peak (989 TFLOP/s, datasheet); "of mm"
uses the matmul rate measured by the ceilings section instead.
"""

from __future__ import annotations

import torch

from .common import Settings, bench_ms, compile_fn, fmt


def train_configs(dry_run: bool) -> dict:
    from benchmarks.train_step import LANE_ASPECT_6_7
    from tpblocks.models import ModelConfig, total_parameters
    from tpblocks.models.flavors import FLAVORS, match_budget_and_aspect

    llama = FLAVORS["llama_135m"]()
    if dry_run:
        llama = llama.replace(vocab_size=512, hidden_size=64, ffn_hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2)
    budget = total_parameters(llama)
    lanes = dict(arch="tp_blocks", vocab_size=llama.vocab_size, tie_embeddings=llama.tie_embeddings,
                 n_heads=llama.n_heads, n_kv_heads=llama.n_kv_heads, lane_count=8, n_classic_layers=1,
                 max_seq_len=llama.max_seq_len, ffn_factor=2.0, lane_ffn_factor=2.0)  # fmt: skip
    recipes = {
        "burger": ModelConfig(recipe="burger", hidden_size=llama.hidden_size, lane_n_heads=llama.n_heads,
                              lane_n_kv_heads=llama.n_kv_heads, **lanes),
        "sandwich": ModelConfig(recipe="sandwich", hidden_size=2 * llama.hidden_size, lane_n_heads=2,
                                lane_n_kv_heads=1, **lanes),
    }  # fmt: skip
    cfgs = {"llama_135m": llama}
    for recipe, cfg in recipes.items():
        cfgs[f"{recipe}-8 (6.7 rule)"] = match_budget_and_aspect(cfg, budget, LANE_ASPECT_6_7[recipe], max_depth=16)
    return cfgs


def time_model(cfg, mode: str, settings: Settings, batch: int, seq: int) -> float:
    """Median ms of one bf16 training step of ``cfg`` with the kernels of ``mode``."""
    from benchmarks.train_step import step_fn
    from kernels import dispatch
    from tpblocks.models import build_model

    torch.manual_seed(0)
    with torch.device(settings.device):
        model = build_model(cfg.replace(max_seq_len=seq)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=settings.cuda)
    net = compile_fn(model, settings) if mode == "compile" else model
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=settings.device)
    dtype = torch.bfloat16
    step = step_fn(net, tokens, hf=False, autocast=dtype, optimizer=optimizer)
    with dispatch.forced("reference" if mode == "compile" else mode):  # compile: inductor fuses the reference
        step()  # the compile, Triton's JIT and the optimizer state happen here
        rep, warmup = (5, 5) if settings.dry_run else (1000, 200)
        return bench_ms(step, settings, rep_ms=rep, warmup_ms=warmup)


def run(settings: Settings, results: dict, phase: str | None = "eager") -> dict:
    """Phase "eager": the Triton and reference modes; "compile": torch.compile. Figures cover both so far."""
    from tpblocks.infer import perfmodel as pm
    from tpblocks.models import total_parameters, training_flops_per_token

    batch, seq = (2, 16) if settings.dry_run else (8, 2048)
    peak = pm.get_hardware("h200").alpha
    measured_mm = results.get("ceilings", {}).get("matmul_bf16_TFLOPs")
    cfgs = train_configs(settings.dry_run)
    earlier = results.get("training", {})
    rows, skipped = list(earlier.get("rows", [])), list(earlier.get("skipped", []))
    for mode in ("compile",) if phase == "compile" else ("triton", "reference"):
        for name, cfg in cfgs.items():
            need = 1 if settings.dry_run else (60 if mode == "compile" else 10)
            if not settings.budget.allows(need):
                skipped.append(f"{name} [{mode}]")
                continue
            row = {"model": name, "mode": mode, "params_M": round(total_parameters(cfg) / 1e6, 2)}
            try:
                ms = time_model(cfg, mode, settings, batch, seq)
            except Exception as e:  # noqa: BLE001 - recorded, the next model still runs
                rows.append({**row, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            flops = training_flops_per_token(cfg, seq)["total"]
            tok_s = batch * seq / (ms * 1e-3)
            row.update(step_ms=round(ms, 3), tokens_per_s=round(tok_s), GFLOP_per_token=round(flops / 1e9, 3),
                       MFU=tok_s * flops / peak, of_measured_mm=tok_s * flops / (measured_mm * 1e12) if measured_mm
                       else None)  # fmt: skip
            rows.append(row)
            if settings.cuda:
                torch.cuda.empty_cache()
    summary = [
        (f"train {r['model']} [{r['mode']}] tokens/s", r["tokens_per_s"], f"MFU {r['MFU']:.3f}")
        if "error" not in r
        else (f"train {r['model']} [{r['mode']}]", "failed", r["error"][:60])
        for r in rows
    ]
    summary += [(f"train {s}", "skipped", "time budget") for s in skipped]
    table = [{"model": r["model"], "mode": r["mode"], "params M": r["params_M"], "step ms": fmt(r.get("step_ms")),
              "tokens/s": fmt(r.get("tokens_per_s"), 4), "MFU": fmt(r.get("MFU"), 2),
              "of mm": fmt(r.get("of_measured_mm"), 2), "error": r.get("error", "")[:60]} for r in rows]  # fmt: skip
    return {"batch": batch, "seq": seq, "peak_flops": peak, "configs": {n: c.to_dict() for n, c in cfgs.items()},
            "rows": rows, "skipped": skipped, "table": table, "summary": summary}  # fmt: skip
