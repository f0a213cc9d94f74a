"""Batch-1 decode latency: Llama baseline, Llama-TP, Sandwich / Burger TP blocks and the no-communication
ceiling, at matched parameters, next to the report's decode-time model calibrated on this machine.

    torchrun --standalone --nproc_per_node=2 benchmarks/decode.py --quick --json decode.json

Every configuration has the same sequential depth and (within 1%) the same parameter count. In one run:
  1. calibrate: t_sync (small all-reduce between the ranks) and beta (matvec weight read, both ranks at once);
  2. time decode steps (KV cache, batch 1, fixed token stream) of
       llama (1 proc)   the unsharded baseline on rank 0 (the other rank idles at a barrier)
       llama-TP         Megatron tensor parallelism over the ranks, 2 syncs per layer (Eq. 9)
       sandwich / burger 1 TP block with one lane group per rank (1 sync, Eq. 11) and a hybrid with classic
                        layers (Eq. 10)
       ... no-comm      the same sharded model with comm.enabled=False: every collective removed (ceiling)
  3. predict each from perfmodel: bytes read per rank / beta + syncs x t_sync.
Configurations are interleaved over rounds so that load from other processes hits them alike; each rank
times its own steps and the slower rank's median is reported (a group step ends when its slowest rank does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import busy_machine_warning, machine_info, print_table, write_json  # noqa: E402
from tpblocks.infer import perfmodel as pm  # noqa: E402
from tpblocks.infer.calibrate import calibrate  # noqa: E402
from tpblocks.models import LocalComm, ModelConfig, build_model, solve_hidden_size, total_parameters  # noqa: E402
from tpblocks.parallel import MeshComm, ParallelDims, destroy_distributed, init_distributed, shard_model  # noqa: E402


def build_configs(hidden: int, depth: int, vocab: int, lanes: int, max_seq_len: int) -> dict[str, ModelConfig]:
    """Llama of ``depth`` layers and TP-block models of the same depth, solved to the Llama's parameter count."""
    common = dict(vocab_size=vocab, n_heads=12, n_kv_heads=4, max_seq_len=max_seq_len, tie_embeddings=True)
    llama = ModelConfig(arch="llama", hidden_size=hidden, ffn_factor=8 / 3, n_layers=depth, **common)
    budget = total_parameters(llama)
    tp = dict(arch="tp_blocks", hidden_size=hidden, ffn_factor=8 / 3, lane_count=lanes, lane_ffn_factor=8 / 3, **common)
    lane_heads = {"sandwich": dict(lane_n_heads=12 // lanes, lane_n_kv_heads=max(1, 4 // lanes)),
                  "burger": dict(lane_n_heads=12, lane_n_kv_heads=4)}  # fmt: skip
    hybrid_depth = (depth - 2) // 2  # 2 x (TP block of this lane depth + 1 classic layer) = depth
    cfgs = {"llama": llama}
    for recipe in ("sandwich", "burger"):
        one = ModelConfig(recipe=recipe, lane_depth=depth, **lane_heads[recipe], **tp)
        hyb = ModelConfig(recipe=recipe, lane_depth=hybrid_depth, tp_block_repetition=2, n_classic_layers=1,
                          **lane_heads[recipe], **tp)  # fmt: skip
        cfgs[f"{recipe}-1blk"] = solve_hidden_size(one, budget)
        cfgs[f"{recipe}-hybrid"] = solve_hidden_size(hyb, budget)
    return cfgs


@torch.no_grad()
def time_decode(model, prompt_len: int, n_tokens: int, warmup: int, seed: int = 0) -> tuple[list[float], float]:
    """Per-step seconds of ``n_tokens`` cached decode steps after a prompt; and blocking syncs per step."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, model.cfg.vocab_size, (prompt_len + warmup + n_tokens,), generator=g)
    cache = model.new_cache(len(stream))
    model(stream[None, :prompt_len], cache)  # prefill
    pos = prompt_len
    for _ in range(warmup):
        model(stream[None, pos : pos + 1], cache)
        pos += 1
    model.comm.counter.reset()
    times = []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        logits = model(stream[None, pos : pos + 1], cache)
        int(logits[0, -1].argmax())  # the greedy pick is part of a decode step
        times.append(time.perf_counter() - t0)
        pos += 1
    return times, model.comm.counter.blocking / n_tokens


def _group_quantile(times: list[float], q: float, devices: int) -> float:
    """Quantile of this rank's steps (max over ranks for a distributed run, rank 0's for the baseline)."""
    if not times:  # the baseline on ranks other than 0
        value = 0.0
    else:
        value = statistics.median(times) if q == 0.5 else sorted(times)[int(q * len(times))]
    t = torch.tensor([value], dtype=torch.float64)
    if devices > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def parse_decode_args(description: str, argv: list[str] | None, *, quick_rounds: int, extra=None):
    """The options every decode benchmark shares (``extra(parser)`` adds more); ``tokens`` / ``rounds`` resolved."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds (about a minute)")
    parser.add_argument("--json", type=str, default=None, help="write every figure here")
    parser.add_argument("--hidden", type=int, default=384, help="Llama hidden size, a multiple of 24 (sets the budget)")
    parser.add_argument("--depth", type=int, default=8, help="sequential depth of every model")
    if extra is not None:
        extra(parser)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled before timing")
    parser.add_argument("--tokens", type=int, default=None, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds over all configurations")
    args = parser.parse_args(argv)
    if args.hidden % 24:
        parser.error(f"--hidden={args.hidden} must be a multiple of 24 (12 heads of even size, split over 2 ranks)")
    # Short rounds interleaved over all configurations: load from other processes then hits them alike.
    args.tokens = args.tokens or (16 if args.quick else 32)
    args.rounds = args.rounds or (quick_rounds if args.quick else 10)
    return args


def run_distributed(script: str, run, args, warmup: int = 3) -> int:
    """``run(args, rank, world, tokens, rounds, warmup)`` on a torchrun group of 2+ ranks, torn down afterwards."""
    rank, world = init_distributed()
    if world < 2:
        print("error: run under torchrun with 2+ ranks: torchrun --standalone --nproc_per_node=2 "
              f"{script} --quick", file=sys.stderr)  # fmt: skip
        return 2
    try:
        return run(args, rank, world, args.tokens, args.rounds, warmup)
    finally:
        destroy_distributed()


def calibrate_decode(llama: ModelConfig, args, rank: int, world: int, tokens: int, rounds: int, warmup: int):
    """(calibration, hardware, in-compute hardware, mean KV length) for the Llama-TP of ``llama``; printed on rank 0."""
    context = args.prompt + warmup + tokens / 2  # average KV length during the timed steps
    llama_tp_bytes = pm.decode_bytes(llama, devices=world, context=context, precision=4).total
    # A Llama-TP sync follows half a layer of weights: the in-compute sync cost is measured after matvecs that size.
    calib = calibrate(beta_bytes=int(llama_tp_bytes), sync_bytes=4 * args.hidden, iters=100 if args.quick else 400,
                      work_bytes=int(llama_tp_bytes / (2 * args.depth)))  # fmt: skip
    hw, hw_star = calib.hardware(), calib.hardware("this_machine_in_compute", in_compute=True)
    if rank == 0:
        print(f"calibrated: t_sync {hw.t_sync * 1e6:.0f} us (p10 {calib.t_sync_p10 * 1e6:.0f}, "
              f"p90 {calib.t_sync_p90 * 1e6:.0f}; {hw_star.t_sync * 1e6:.0f} between matvecs), "
              f"beta {hw.beta / 1e9:.2f} GB/s at "
              f"{calib.beta_bytes / 2**20:.0f} MiB; {tokens} steps x {rounds} rounds", flush=True)  # fmt: skip
    return calib, hw, hw_star, context


def time_interleaved(runs: dict, prompt: int, tokens: int, warmup: int, rounds: int, rank: int, first_round=None):
    """Per-step seconds and blocking syncs per step of every ``label -> (model, devices, communicate)``.

    Configurations are interleaved over ``rounds`` so that load from other processes hits them alike. A
    one-device run (the unsharded baseline) is timed on rank 0 only, between barriers. ``communicate=False``
    times the sharded model with ``comm.enabled = False``; ``first_round(label, model)`` runs right after a
    configuration's first round, still in that state.
    """
    times: dict[str, list[float]] = {k: [] for k in runs}
    syncs: dict[str, float] = {}
    for r in range(rounds):
        for label, (model, devices, communicate) in runs.items():
            if devices == 1:
                dist.barrier()
                if rank == 0:
                    t, _ = time_decode(model, prompt, tokens, warmup, seed=r)
                    times[label] += t
                    syncs[label] = 0.0  # LocalComm counts its calls, but one process communicates nothing
                dist.barrier()
                continue
            model.comm.enabled = communicate
            t, s = time_decode(model, prompt, tokens, warmup, seed=r)
            times[label] += t
            syncs[label] = s if communicate else 0.0  # disabled calls are counted but do no communication
            if r == 0 and first_round is not None:
                first_round(label, model)
            model.comm.enabled = True
    return times, syncs


def main(argv: list[str] | None = None) -> int:
    args = parse_decode_args("batch-1 decode latency vs the calibrated decode-time model", argv, quick_rounds=4)
    return run_distributed("benchmarks/decode.py", _run, args)


def _run(args, rank: int, world: int, tokens: int, rounds: int, warmup: int) -> int:
    cfgs = build_configs(args.hidden, args.depth, args.vocab, world, args.prompt + warmup + tokens + 8)
    mesh = ParallelDims(dp=1, lane=world, world_size=world).build_mesh("cpu")
    calib, hw, hw_star, context = calibrate_decode(cfgs["llama"], args, rank, world, tokens, rounds, warmup)

    # Build every model once (same seed on every rank: shard_model needs identical full weights).
    # Every rank holds the same labels in the same order (the collectives inside must line up); the
    # one-process baseline only has a model on rank 0.
    torch.manual_seed(0)
    baseline = build_model(cfgs["llama"], LocalComm()).eval() if rank == 0 else None
    runs: dict[str, tuple] = {"llama (1 proc)": (cfgs["llama"], baseline, 1, True)}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        comm = MeshComm(mesh)
        model = shard_model(build_model(cfg).eval(), comm)
        label = "llama-TP" if name == "llama" else name
        runs[label] = (cfg, model, world, True)
        runs[f"{label} no-comm"] = (cfg, model, world, False)

    timed = {label: (model, devices, communicate) for label, (_, model, devices, communicate) in runs.items()}
    times, syncs = time_interleaved(timed, args.prompt, tokens, warmup, rounds, rank)

    rows, figures = [], {}
    for label, (cfg, model, devices, communicate) in runs.items():
        # Collective on every rank: the slower rank's median / p10 (rank 0's own for the baseline).
        measured = _group_quantile(times[label], 0.5, devices)
        p10 = _group_quantile(times[label], 0.1, devices)
        if rank != 0:
            continue
        nbytes = pm.decode_bytes(cfg, devices=devices, context=context, precision=4).total
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        n_syncs = pm.syncs_for_config(cfg) if communicate and devices > 1 else 0
        pred = pm.predict_bytes(nbytes, n_syncs, hw, devices)
        pred_star = pm.predict_bytes(nbytes, n_syncs, hw_star, devices)
        figures[label] = dict(
            params=total_parameters(cfg), bytes_per_rank=nbytes, param_bytes_held=held, devices=devices,
            syncs_measured=syncs.get(label, 0.0), syncs_formula=n_syncs, measured_s=measured,
            measured_p10_s=p10,
            predicted_s=pred.t_decode, predicted_in_compute_s=pred_star.t_decode, predicted_memory_s=pred.t_memory,
            predicted_sync_s=pred.t_sync_total,
            config=cfg.to_dict(),
        )  # fmt: skip
    if rank != 0:
        return 0

    base, base_pred = figures["llama-TP"]["measured_s"], figures["llama-TP"]["predicted_s"]
    base_star = figures["llama-TP"]["predicted_in_compute_s"]
    for label, f in figures.items():
        ceiling = figures.get(label if label.endswith("no-comm") else f"{label} no-comm")
        f["speedup_vs_llama_tp"] = base / f["measured_s"]
        f["predicted_speedup_vs_llama_tp"] = base_pred / f["predicted_s"]
        f["predicted_in_compute_speedup_vs_llama_tp"] = base_star / f["predicted_in_compute_s"]
        f["fraction_of_ceiling"] = ceiling["measured_s"] / f["measured_s"] if ceiling else None
        # Semi-empirical check of the sync term alone: measured ceiling + syncs x t_sync.
        f["ceiling_plus_syncs_s"] = ceiling["measured_s"] + f["syncs_formula"] * hw.t_sync if ceiling else None
        rows.append({
            "config": label,
            "params": f"{f['params'] / 1e6:.1f}M",
            "MB/rank": f"{f['bytes_per_rank'] / 1e6:.1f}",
            "syncs/tok": f"{f['syncs_measured']:g}",
            "Eq.": f["syncs_formula"],
            "meas ms": f"{f['measured_s'] * 1e3:.2f}",
            "p10 ms": f"{f['measured_p10_s'] * 1e3:.2f}",
            "pred ms": f"{f['predicted_s'] * 1e3:.2f}",
            "meas/pred": f"{f['measured_s'] / f['predicted_s']:.2f}",
            "pred* ms": f"{f['predicted_in_compute_s'] * 1e3:.2f}",
            "ceil+syncs ms": f"{f['ceiling_plus_syncs_s'] * 1e3:.2f}" if f["ceiling_plus_syncs_s"] else "",
            "speedup": f"{f['speedup_vs_llama_tp']:.2f}",
            "pred speedup": f"{f['predicted_speedup_vs_llama_tp']:.2f}",
            "pred* speedup": f"{f['predicted_in_compute_speedup_vs_llama_tp']:.2f}",
            "of ceiling": f"{f['fraction_of_ceiling']:.2f}" if f["fraction_of_ceiling"] else "",
        })  # fmt: skip
    title = (f"\nbatch-1 decode, {world} ranks (gloo), depth {args.depth}, fp32 "
             f"(t_sync {hw.t_sync * 1e6:.0f} us, beta {hw.beta / 1e9:.2f} GB/s measured in this run)")  # fmt: skip
    print_table(rows, title=title)
    verdicts = []
    for label in ("sandwich-1blk", "burger-1blk"):
        f = figures[label]
        miss = f["speedup_vs_llama_tp"] / f["predicted_speedup_vs_llama_tp"] - 1
        miss_star = f["speedup_vs_llama_tp"] / f["predicted_in_compute_speedup_vs_llama_tp"] - 1
        verdicts.append(
            f"{label}: speedup {f['speedup_vs_llama_tp']:.2f}x vs predicted {f['predicted_speedup_vs_llama_tp']:.2f}x "
            f"({miss:+.0%}, target within 15%: {'met' if abs(miss) <= 0.15 else 'MISSED'}; with the in-compute "
            f"t_sync {f['predicted_in_compute_speedup_vs_llama_tp']:.2f}x, {miss_star:+.0%}); "
            f"{f['fraction_of_ceiling']:.2f} of the no-comm ceiling (target >= 0.9: "
            f"{'met' if f['fraction_of_ceiling'] >= 0.9 else 'MISSED'})"
        )
    tp, tp_free = figures["llama-TP"], figures["llama-TP no-comm"]
    in_decode = (tp["measured_s"] - tp_free["measured_s"]) / max(1, tp["syncs_formula"])
    verdicts.append(
        f"sync cost inside decode (Llama-TP minus its no-comm ceiling, per sync): {in_decode * 1e6:.0f} us; "
        f"calibrated: back-to-back all-reduce {hw.t_sync * 1e6:.0f} us, between matvecs {hw_star.t_sync * 1e6:.0f} us"
    )
    warning = busy_machine_warning()
    if warning:
        verdicts.append(warning)
    print("\n".join(verdicts))
    info = machine_info()
    print(f"machine: {info}")
    if args.json:
        write_json(args.json, {
            "benchmark": "decode", "world": world, "tokens": tokens, "rounds": rounds, "prompt": args.prompt,
            "calibration": calib.as_dict(), "hardware": hw.__dict__, "hardware_in_compute": hw_star.__dict__,
            "results": figures, "verdicts": verdicts,
            "machine": info,
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
