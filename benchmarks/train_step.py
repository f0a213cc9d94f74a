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
The machine is noisy, so the models are timed round-robin in the same run and each figure is a median;
only the ratios are meaningful.

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
from tpblocks.models.flavors import match_budget_and_aspect

BASELINE = "llama (tpblocks)"
HF = "llama (transformers)"
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


def step_fn(model: torch.nn.Module, tokens: torch.Tensor, hf: bool):
    def step() -> None:
        out = model(tokens)
        logits = out.logits if hf else out
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
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
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd models (fuses the lanes' elementwise work; cold compiles "
                             "take minutes on CPU)")  # fmt: skip
    args = parser.parse_args()
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
    times = time_round_robin(steps, repeats=6 if args.quick else 10)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [_row(name, t, median, cfgs, seq, tokens.numel()) for name, t in median.items()]
    checks = _checks(median, rows)
    print_table(rows, title=f"train step (fwd+bwd), batch {args.batch} x seq {seq}, median of {len(times[BASELINE])}")
    for key, value in checks.items():
        print(f"  {key}: {value}")
    if warning := busy_machine_warning():
        print(warning)
    if args.json:
        write_json(args.json, {"benchmark": "train_step", "machine": machine_info(), "rows": rows, "checks": checks,
                               "configs": {n: c.to_dict() for n, c in cfgs.items()}})  # fmt: skip


def _row(name: str, t: float, median: dict, cfgs: dict, seq: int, n_tokens: int) -> dict:
    """One table row; a compiled model is compared with the compiled baseline, HF's Llama with ours."""
    model = name.removesuffix(" [compiled]")
    cfg = cfgs[BASELINE if model == HF else model]
    baseline_time = median[f"{BASELINE} [compiled]"] if name.endswith("[compiled]") else median[BASELINE]
    flops = training_flops_per_token(cfg, seq)["total"]
    time_ratio, flop_ratio = t / baseline_time, flops / training_flops_per_token(cfgs[BASELINE], seq)["total"]
    return {
        "model": name,
        "params_M": round(total_parameters(cfg) / 1e6, 3),
        "param_ratio": round(total_parameters(cfg) / total_parameters(cfgs[BASELINE]), 4),
        "lanes_x_depth": f"{cfg.lane_count}x{cfg.lane_depth}" if cfg.arch == "tp_blocks" else f"-x{cfg.n_layers}",
        "width": cfg.lane_hidden_size if cfg.arch == "tp_blocks" else cfg.hidden_size,
        "MFLOP_per_token": round(flops / 1e6, 2),
        "flop_ratio": round(flop_ratio, 3),
        "step_ms": round(t * 1e3, 1),
        "ratio_vs_baseline": round(time_ratio, 3),
        "time_per_flop_ratio": round(time_ratio / flop_ratio, 3),
        "tokens_per_s": round(n_tokens / t),
    }


def _checks(median: dict, rows: list[dict]) -> dict:
    ratio = {row["model"]: row["ratio_vs_baseline"] for row in rows}
    checks: dict = {"target_lanes_max": 1.15}
    for name in ratio:
        if name.startswith(("burger", "sandwich")):
            checks[f"{name} within target"] = ratio[name] <= 1.15
    if HF in median:
        checks["baseline_speed_over_hf"] = round(median[HF] / median[BASELINE], 3)
        checks["target_baseline_over_hf_min"] = 1.0
    return checks


if __name__ == "__main__":
    main()
