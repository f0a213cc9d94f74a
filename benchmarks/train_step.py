"""Forward+backward step time: Burger-8 and Sandwich-8 against the Llama baseline at matched parameters,
and the baseline against Hugging Face ``LlamaForCausalLM`` at the same config. One process.

Targets (issue: model zoo): lanes <= 1.15x the baseline's step time; baseline >= 1.0x HF's speed.
``--compile`` adds torch.compile'd rows (each compared with the compiled baseline).
The machine is noisy, so the models are timed round-robin in the same run and each figure is a median;
only the ratios are meaningful.

    python benchmarks/train_step.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, print_table, write_json
from tpblocks.models import ModelConfig, build_model, solve_hidden_size, total_parameters


def configs(quick: bool) -> dict[str, ModelConfig]:
    seq = 128 if quick else 256
    baseline = ModelConfig(arch="llama", vocab_size=4096, hidden_size=256, n_heads=4, n_kv_heads=2, ffn_factor=2.75,
                           n_layers=8, max_seq_len=seq)  # fmt: skip
    budget = total_parameters(baseline)
    lanes = dict(arch="tp_blocks", vocab_size=4096, n_heads=4, n_kv_heads=2, lane_count=8, lane_depth=4,
                 n_classic_layers=1, max_seq_len=seq, ffn_factor=2.75, lane_ffn_factor=2.75)  # fmt: skip
    burger = solve_hidden_size(ModelConfig(recipe="burger", hidden_size=256, lane_n_heads=4, lane_n_kv_heads=1,
                                           **lanes), budget, tolerance=0.02)  # fmt: skip
    sandwich = solve_hidden_size(ModelConfig(recipe="sandwich", hidden_size=512, lane_n_heads=2, lane_n_kv_heads=1,
                                             **lanes), budget, tolerance=0.02)  # fmt: skip
    return {"llama (tpblocks)": baseline, "burger-8": burger, "sandwich-8": sandwich}


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
    seq = cfgs["llama (tpblocks)"].max_seq_len
    tokens = torch.randint(0, 4096, (args.batch, seq))
    models = {name: build_model(cfg) for name, cfg in cfgs.items()}
    steps = {name: step_fn(m, tokens, hf=False) for name, m in models.items()}
    params = {name: m.num_parameters() for name, m in models.items()}
    if args.compile:
        for name in list(models):
            steps[f"{name} [compiled]"] = step_fn(torch.compile(models[name]), tokens, hf=False)
            params[f"{name} [compiled]"] = params[name]
    try:
        from tpblocks.models.hf import to_hf

        hf_model = to_hf(models["llama (tpblocks)"]).train()
        hf_model.config._attn_implementation = "sdpa"
        steps["llama (transformers)"] = step_fn(hf_model, tokens, hf=True)
        params["llama (transformers)"] = sum(p.numel() for p in hf_model.parameters())
    except ImportError:
        print("transformers is not installed: the HF comparison is skipped")
    times = time_round_robin(steps, repeats=4 if args.quick else 10)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = median["llama (tpblocks)"]
    rows = []
    for name, t in median.items():
        baseline = median["llama (tpblocks) [compiled]"] if name.endswith("[compiled]") else base
        rows.append({
            "model": name,
            "params_M": round(params[name] / 1e6, 3),
            "param_ratio": round(params[name] / params["llama (tpblocks)"], 4),
            "step_ms": round(t * 1e3, 1),
            "ratio_vs_baseline": round(t / baseline, 3),
            "tokens_per_s": round(tokens.numel() / t),
        })  # fmt: skip
    checks = {
        "burger_over_baseline": round(median["burger-8"] / base, 3),
        "sandwich_over_baseline": round(median["sandwich-8"] / base, 3),
        "target_lanes_max": 1.15,
    }
    if args.compile:
        compiled_base = median["llama (tpblocks) [compiled]"]
        checks["burger_over_baseline_compiled"] = round(median["burger-8 [compiled]"] / compiled_base, 3)
        checks["sandwich_over_baseline_compiled"] = round(median["sandwich-8 [compiled]"] / compiled_base, 3)
    if "llama (transformers)" in median:
        checks["baseline_speed_over_hf"] = round(median["llama (transformers)"] / base, 3)
        checks["target_baseline_over_hf_min"] = 1.0
    print_table(rows, title=f"train step (fwd+bwd), batch {args.batch} x seq {seq}, median of {len(times[name])}")
    for key, value in checks.items():
        print(f"  {key}: {value}")
    if args.json:
        write_json(args.json, {"benchmark": "train_step", "machine": machine_info(), "rows": rows, "checks": checks,
                               "configs": {n: c.to_dict() for n, c in cfgs.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
