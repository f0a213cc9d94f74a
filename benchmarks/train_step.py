"""Forward+backward step time: Burger-8 and Sandwich-8 against the Llama baseline at matched parameters,
and the baseline against Hugging Face ``LlamaForCausalLM`` at the same config. One process.

Targets (issue: model zoo): lanes <= 1.15x the baseline's step time; baseline >= 1.0x HF's speed.

Each recipe is sized two ways, both within 2 % of the baseline's parameters:
  "(6.7 rule)"  the report's §6.7 sizing rule for its 8-lane models: one TP block + one classic layer, the
               lane depth whose lane aspect ratio (lane width / lane depth) is nearest 400 (Burger) or 100
               (Sandwich); at this small width that is one layer per lane;
  "(depth 4)"   four layers per lane, the shape of the report's Table 4 Burgers.
Equal parameters do not mean equal work: a Burger lane is as wide as the model, so deep Burger lanes run
far more attention. The FLOP columns (PaLM convention, ``training_flops_per_token``) show how much of a
step-time ratio is extra work and how much is the implementation (``time_per_flop_ratio``).

``--compile`` adds torch.compile'd rows (each compared with the compiled baseline).
Every run also times the report's own Table 5 pair at its real size (Burger-0, 147M, against the Table 14
Llama, 135.8M; context 128 as in §5.2), whose training the report measured at 35h40 against 8h (4.46x).
The machine is noisy, so the models are timed round-robin in the same run: step_ms is a median, and every
ratio is the median over rounds of that round's ratio (the models of one round run back to back, so a change
in machine load between rounds cancels). Only the ratios are meaningful.

    python benchmarks/train_step.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from benchmarks.common import busy_machine_warning, machine_info, print_table, write_json
from tpblocks.models import ModelConfig, build_model, solve_hidden_size, total_parameters, training_flops_per_token
from tpblocks.models.flavors import FLAVORS, match_budget_and_aspect

BASELINE = "llama (tpblocks)"
HF = "llama (transformers)"
# Report Table 5: training time of Burger-0 and of the Llama2 baseline on one A100 (35h40 and 8h).
REPORT_PAIR = {"llama_135m": "Llama2 (Table 14)", "burger_t4_0": "Burger-0 (Table 4)"}
REPORT_TABLE5_HOURS = {"llama_135m": 8.0, "burger_t4_0": 35 + 40 / 60}
LANE_ASPECT_6_7 = {"burger": 400, "sandwich": 100}  # report §6.7: lane width / lane depth of the 8-lane models


def configs(quick: bool) -> dict[str, ModelConfig]:
    seq = 128 if quick else 256
    baseline = ModelConfig(arch="llama", vocab_size=4096, hidden_size=256, n_heads=4, n_kv_heads=2, ffn_factor=2.75,
                           n_layers=8, max_seq_len=seq)  # fmt: skip
    budget = total_parameters(baseline)
    lanes = dict(arch="tp_blocks", vocab_size=4096, n_heads=4, n_kv_heads=2, lane_count=8, lane_depth=4,
                 n_classic_layers=1, max_seq_len=seq, ffn_factor=2.75, lane_ffn_factor=2.75)  # fmt: skip
    recipes = {
        "burger": ModelConfig(recipe="burger", hidden_size=256, lane_n_heads=4, lane_n_kv_heads=1, **lanes),
        "sandwich": ModelConfig(recipe="sandwich", hidden_size=512, lane_n_heads=2, lane_n_kv_heads=1, **lanes),
    }
    cfgs = {BASELINE: baseline}
    for recipe, cfg in recipes.items():
        cfgs[f"{recipe}-8 (6.7 rule)"] = match_budget_and_aspect(cfg, budget, LANE_ASPECT_6_7[recipe], max_depth=8)
        cfgs[f"{recipe}-8 (depth 4)"] = solve_hidden_size(cfg, budget, tolerance=0.02)
    return cfgs


def step_fn(model: torch.nn.Module, tokens: torch.Tensor, hf: bool, autocast: torch.dtype | None = None,
            optimizer: torch.optim.Optimizer | None = None):  # fmt: skip
    """One training step: forward (under ``autocast`` when given, as the trainer's bf16), fp32 loss, backward,
    ``optimizer.step()`` when given, gradients cleared."""

    def step() -> None:
        with torch.autocast(tokens.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = model(tokens)
        logits = out.logits if hf else out
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def time_round_robin(steps: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sequence and fewer repeats (~1 min)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--system-allocator", action="store_true",
                        help="keep glibc's default malloc settings (by default freed CPU memory is retained for "
                             "reuse, as the trainer does: tpblocks/train/cpu_allocator.py)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd models (fuses the lanes' elementwise work; cold compiles "
                             "take minutes on CPU)")  # fmt: skip
    args = parser.parse_args()
    # Imported here: tpblocks.train imports the trainer (hydra, deepspeed, ...), which step_fn's users may lack.
    from tpblocks.train.cpu_allocator import retain_freed_memory

    allocator = "system" if args.system_allocator or not retain_freed_memory() else "retain"
    torch.manual_seed(0)
    cfgs = configs(args.quick)
    seq = cfgs[BASELINE].max_seq_len
    tokens = torch.randint(0, 4096, (args.batch, seq))
    models = {name: build_model(cfg) for name, cfg in cfgs.items()}
    steps = {name: step_fn(m, tokens, hf=False) for name, m in models.items()}
    if args.compile:
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")  # inductor's own noise
        for name in list(models):
            steps[f"{name} [compiled]"] = step_fn(torch.compile(models[name]), tokens, hf=False)
    try:
        from tpblocks.models.hf import to_hf

        hf_model = to_hf(models[BASELINE]).train()
        hf_model.config._attn_implementation = "sdpa"
        steps[HF] = step_fn(hf_model, tokens, hf=True)
    except ImportError:
        print("transformers is not installed: the HF comparison is skipped")
    times = time_round_robin(steps, repeats=8 if args.quick else 16)
    rows = [_row(name, times, cfgs, seq, tokens.numel()) for name in times]
    checks = _checks(times, rows)
    print_table(rows, title=f"train step (fwd+bwd), batch {args.batch} x seq {seq}, {len(times[BASELINE])} rounds, "
                            f"CPU allocator {allocator}")  # fmt: skip
    for key, value in checks.items():
        print(f"  {key}: {value}")
    payload = {"benchmark": "train_step", "machine": {**machine_info(), "cpu_allocator": allocator}, "rows": rows,
               "checks": checks,
               "configs": {n: c.to_dict() for n, c in cfgs.items()}}  # fmt: skip
    payload["report_scale_flops"] = report_scale_flops()
    payload["report_table5_pair"] = report_pair(args.batch, repeats=3 if args.quick else 5)
    if warning := busy_machine_warning():
        print(warning)
    if args.json:
        write_json(args.json, payload)


def report_scale_flops(seq: int = 2048) -> list[dict]:
    """Analytic: the FLOP ratio of the report's 1.5B 8-lane models against a parameter-matched Llama.

    The Llama has TinyLlama's shape (22 layers, 32 heads, 4 KV heads; the report's §6.7 reference) with SwiGLU
    2.75 h, the lane model's vocabulary and tying, and its hidden size solved to the lane model's budget.
    """
    rows = []
    for name in ("burger_1p5b_8lane", "sandwich_1p5b_8lane"):
        cfg = FLAVORS[name]()
        llama = FLAVORS["tinyllama_1p1b"]().replace(
            vocab_size=cfg.vocab_size, tie_embeddings=cfg.tie_embeddings, ffn_hidden_size=None, ffn_factor=2.75
        )
        llama = solve_hidden_size(llama, total_parameters(cfg), tolerance=0.01)
        flops, llama_flops = training_flops_per_token(cfg, seq), training_flops_per_token(llama, seq)
        rows.append({
            "model": name,
            "params_B": round(total_parameters(cfg) / 1e9, 3),
            "lanes_x_depth": _shape(cfg),
            "width": cfg.lane_hidden_size,
            "matched_llama": f"{llama.n_layers} x {llama.hidden_size}",
            "llama_params_B": round(total_parameters(llama) / 1e9, 3),
            "attention_flop_ratio": round(flops["attention"] / llama_flops["attention"], 3),
            "flop_ratio": round(flops["total"] / llama_flops["total"], 3),
        })  # fmt: skip
    print_table(rows, title=f"report's §6.7 1.5B models against a parameter-matched Llama (analytic, seq {seq})")
    return rows


def report_pair(batch: int, seq: int = 128, repeats: int = 5) -> list[dict]:
    """The report's Table 5 Burger-0 / Llama2 pair at full size, next to the training-time ratio it printed."""
    cfgs = {name: FLAVORS[name]() for name in REPORT_PAIR}
    tokens = torch.randint(0, cfgs["llama_135m"].vocab_size, (batch, seq))
    steps = {name: step_fn(build_model(cfg), tokens, hf=False) for name, cfg in cfgs.items()}
    times = time_round_robin(steps, repeats, warmup=1)
    rows = []
    for name in cfgs:
        row = _row(name, times, cfgs, seq, tokens.numel(), baseline="llama_135m")
        row["model"] = REPORT_PAIR[name]
        row["report_time_ratio"] = round(REPORT_TABLE5_HOURS[name] / REPORT_TABLE5_HOURS["llama_135m"], 3)
        rows.append(row)
    print_table(rows, title=f"report's Table 5 pair at full size (not parameter-matched), batch {batch} x seq {seq}, "
                            f"{repeats} rounds")  # fmt: skip
    return rows


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of name's time / reference's time in the same round."""
    return statistics.median(t / ref for t, ref in zip(times[name], times[reference], strict=True))


def _row(name: str, times: dict, cfgs: dict, seq: int, n_tokens: int, baseline: str = BASELINE) -> dict:
    """One table row; a compiled model is compared with the compiled baseline, HF's Llama with ours."""
    model = name.removesuffix(" [compiled]")
    cfg = cfgs[baseline if model == HF else model]
    t = statistics.median(times[name])
    time_ratio = paired_ratio(times, name, f"{baseline} [compiled]" if name.endswith("[compiled]") else baseline)
    flops = training_flops_per_token(cfg, seq)["total"]
    flop_ratio = flops / training_flops_per_token(cfgs[baseline], seq)["total"]
    return {
        "model": name,
        "params_M": round(total_parameters(cfg) / 1e6, 3),
        "param_ratio": round(total_parameters(cfg) / total_parameters(cfgs[baseline]), 4),
        "lanes_x_depth": _shape(cfg),
        "width": cfg.lane_hidden_size if cfg.arch == "tp_blocks" else cfg.hidden_size,
        "MFLOP_per_token": round(flops / 1e6, 2),
        "flop_ratio": round(flop_ratio, 3),
        "step_ms": round(t * 1e3, 1),
        "ratio_vs_baseline": round(time_ratio, 3),
        "time_per_flop_ratio": round(time_ratio / flop_ratio, 3),
        "tokens_per_s": round(n_tokens / t),
    }


def _shape(cfg: ModelConfig) -> str:
    """'8x4' for one TP block of 8 lanes of depth 4, '4*(8x4)' for four such blocks, '-x8' for 8 dense layers."""
    if cfg.arch != "tp_blocks":
        return f"-x{cfg.n_layers}"
    block = f"{cfg.lane_count}x{cfg.lane_depth}"
    return block if cfg.tp_block_repetition == 1 else f"{cfg.tp_block_repetition}*({block})"


def _checks(times: dict, rows: list[dict]) -> dict:
    ratio = {row["model"]: row["ratio_vs_baseline"] for row in rows}
    checks: dict = {"target_lanes_max": 1.15}
    for name in ratio:
        if name.startswith(("burger", "sandwich")):
            checks[f"{name} within target"] = ratio[name] <= 1.15
    if HF in times:
        checks["baseline_speed_over_hf"] = round(paired_ratio(times, HF, BASELINE), 3)
        checks["target_baseline_over_hf_min"] = 1.0
    return checks


if __name__ == "__main__":
    main()
