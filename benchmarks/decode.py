"""Batch-1 decode latency: Llama baseline, Llama-TP, Sandwich / Burger TP blocks and the no-communication
ceiling, at matched parameters, next to the report's decode-time model calibrated on this machine.

    torchrun --standalone --nproc_per_node=2 benchmarks/decode.py --quick --json decode.json
    torchrun --standalone --nproc_per_node=2 benchmarks/decode.py --preset gptfast --compile --dtype bf16 --batch 4

Every configuration has the same sequential depth and (within 1%) the same parameter count. Presets: ``default``
(hidden 384, depth 8, vocab 4096, tied) and ``gptfast`` (gpt-fast-like: 12 layers, width 512, 8 heads / 8 KV
heads, FFN 1536, vocab 32000 untied, ~74M). In one run:
  1. calibrate: t_sync (small all-reduce between the ranks) and beta (matvec weight read, both ranks at once);
  2. time decode steps of the decode engine (static KV cache, fixed token stream, ``--batch`` sequences,
     ``--dtype`` weights; with ``--compile`` every configuration also as a compiled step, side by side: on CPU
     the engine's default, frozen (inductor freezing: weights folded, linears prepacked for MKL); ``--unfrozen``
     adds the plain compiled step as ``[compiled, unfrozen]`` rows) of
       llama (1 proc)   the unsharded baseline on rank 0 (the other rank idles at a barrier)
       llama-TP         Megatron tensor parallelism over the ranks, 2 syncs per layer (Eq. 9)
       sandwich / burger 1 TP block with one lane group per rank (1 sync, Eq. 11) and a hybrid with classic
                        layers (Eq. 10)
       ... no-comm      the same sharded model with comm.enabled=False: every collective removed (ceiling)
  3. predict each two ways: ``pred``, the report's model with the in-compute t_sync (bytes read per rank / beta
     + syncs x t_sync), and ``pred@step``, the row's own measured no-comm ceiling + syncs x the sync cost paid
     inside a decode step, measured in this run as (Llama-TP - Llama-TP no-comm) / its syncs, per mode (eager,
     compiled). The back-to-back all-reduce under-prices a sync paid inside a step (rank skew, cold cache), so
     ``pred@step`` is the calibration the 15 % target is judged on (exact for Llama-TP by construction).
Bytes per rank count the whole static KV buffer (the step reads all of it, masked). ``GB/s`` is bytes per rank
over the measured step; ``roofline`` is (bytes / beta) over the measured step.
Configurations are interleaved over rounds so that load from other processes hits them alike; each rank
times its own steps and the slower rank's median is reported (a group step ends when its slowest rank does).
"""

from __future__ import annotations

import argparse
import contextlib
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
from tpblocks.infer.engine import DecodeEngine, resolve_dtype  # noqa: E402
from tpblocks.models import LocalComm, ModelConfig, build_model, solve_hidden_size, total_parameters  # noqa: E402
from tpblocks.parallel import MeshComm, ParallelDims, destroy_distributed, init_distributed, shard_model  # noqa: E402

PRESETS = {
    "default": dict(hidden=384, depth=8, vocab=4096, n_heads=12, n_kv_heads=4, ffn_factor=8 / 3, tie=True),
    # gpt-fast-like scale: 12 x 512, 8 heads and 8 KV heads, FFN 1536, vocab 32000 untied (~74M parameters).
    "gptfast": dict(hidden=512, depth=12, vocab=32000, n_heads=8, n_kv_heads=8, ffn_factor=3.0, tie=False),
}


def build_configs(preset: dict, lanes: int, max_seq_len: int) -> dict[str, ModelConfig]:
    """Llama of ``depth`` layers and TP-block models of the same depth, solved to the Llama's parameter count."""
    n, k, ffn, depth = preset["n_heads"], preset["n_kv_heads"], preset["ffn_factor"], preset["depth"]
    common = dict(vocab_size=preset["vocab"], n_heads=n, n_kv_heads=k, max_seq_len=max_seq_len,
                  tie_embeddings=preset["tie"])  # fmt: skip
    llama = ModelConfig(arch="llama", hidden_size=preset["hidden"], ffn_factor=ffn, n_layers=depth, **common)
    budget = total_parameters(llama)
    tp = dict(arch="tp_blocks", hidden_size=preset["hidden"], ffn_factor=ffn, lane_count=lanes, lane_ffn_factor=ffn,
              **common)  # fmt: skip
    lane_heads = {"sandwich": dict(lane_n_heads=n // lanes, lane_n_kv_heads=max(1, k // lanes)),
                  "burger": dict(lane_n_heads=n, lane_n_kv_heads=k)}  # fmt: skip
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
def time_decode(engine: DecodeEngine, prompt_len: int, n_tokens: int, warmup: int, seed: int = 0, around=None):
    """Per-step seconds of ``n_tokens`` decode steps after a prompt; and blocking syncs per step (eager only).
    ``around``: a context manager the timed steps run in (a profiler).

    A fixed random token stream is fed (the same for every configuration); the greedy pick of each step is
    computed and kept waiting on, as a decode loop would.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.cfg.vocab_size
    stream = torch.randint(0, vocab, (engine.batch, prompt_len + warmup + n_tokens), generator=g).to(engine.device)
    engine.prefill(stream[:, :prompt_len])
    pos = prompt_len
    for _ in range(warmup):
        engine.decode(stream[:, pos : pos + 1], torch.tensor([pos], device=engine.device))
        pos += 1
    counter = engine.model.comm.counter
    counter.reset()
    times = []
    with around or contextlib.nullcontext():
        for _ in range(n_tokens):
            input_pos = torch.tensor([pos], device=engine.device)
            t0 = time.perf_counter()
            picked = engine.pick(engine.decode(stream[:, pos : pos + 1], input_pos))
            int(picked[0])  # the step is done when its token is known
            times.append(time.perf_counter() - t0)
            pos += 1
    return times, counter.blocking / n_tokens


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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model scale (module doc)")
    parser.add_argument("--hidden", type=int, default=None, help="Llama hidden size (sets the budget); preset's")
    parser.add_argument("--depth", type=int, default=None, help="sequential depth of every model; preset's")
    if extra is not None:
        extra(parser)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size; preset's")
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode step, side by side")
    parser.add_argument("--unfrozen", action="store_true",
                        help="with --compile: also the compiled step without inductor freezing (CPU), side by side")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="decode weights")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--vocab-parallel", action="store_true",
                        help="sharded configurations split the output head by vocabulary rows (+1 tiny sync)")
    parser.add_argument("--profile", nargs="+", default=[], metavar="ROW",
                        help="after timing, print torch.profiler's op table for these rows (labels as printed)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled before timing")
    parser.add_argument("--tokens", type=int, default=None, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds over all configurations")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key in ("hidden", "depth", "vocab"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    args.hidden, args.depth, args.vocab, args.model = preset["hidden"], preset["depth"], preset["vocab"], preset
    heads = 2 * preset["n_heads"]
    if args.hidden % heads:
        parser.error(f"--hidden={args.hidden} must be a multiple of {heads} ({preset['n_heads']} heads of even size)")
    if args.batch < 1:
        parser.error(f"--batch={args.batch} must be >= 1")
    if args.unfrozen and not args.compile:
        parser.error("--unfrozen adds compiled rows: pass --compile too")
    args.modes = decode_modes(args)
    args.precision = torch.finfo(resolve_dtype(args.dtype)).bits // 8  # bytes per weight, for the byte counts
    # Short rounds interleaved over all configurations: load from other processes then hits them alike.
    args.tokens = args.tokens or (16 if args.quick else 32)
    args.rounds = args.rounds or (quick_rounds if args.quick else 10)
    return args


def decode_modes(args) -> dict[str, dict]:
    """Label suffix -> DecodeEngine options of every timed mode: eager, and with ``--compile`` the compiled step
    (frozen on CPU, the engine's default) and with ``--unfrozen`` the compiled step without freezing."""
    modes = {"": dict(compile=False)}
    if args.compile:
        modes[" [compiled]"] = dict(compile=True)
    if args.unfrozen:
        modes[" [compiled, unfrozen]"] = dict(compile=True, freeze=False)
    return modes


def split_mode(label: str) -> tuple[str, str]:
    """(configuration, mode suffix) of a row label: ``"burger-1blk no-comm [compiled]"`` -> (``"burger-1blk
    no-comm"``, ``" [compiled]"``); an eager label has the suffix ``""``."""
    base, bracket, rest = label.partition(" [")
    return base, bracket + rest


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
    context = args.prompt + warmup + tokens  # the static cache's length: every step reads all of it (masked)
    llama_tp_bytes = pm.decode_bytes(llama, devices=world, context=context, precision=4).total
    # A Llama-TP sync follows half a layer of weights: the in-compute sync cost is measured after matvecs that size.
    calib = calibrate(beta_bytes=int(llama_tp_bytes), sync_bytes=4 * args.hidden * args.batch,
                      iters=100 if args.quick else 400,
                      work_bytes=int(llama_tp_bytes / (2 * args.depth)))  # fmt: skip
    hw, hw_star = calib.hardware(), calib.hardware("this_machine_in_compute", in_compute=True)
    if rank == 0:
        print(f"calibrated: t_sync {hw.t_sync * 1e6:.0f} us (p10 {calib.t_sync_p10 * 1e6:.0f}, "
              f"p90 {calib.t_sync_p90 * 1e6:.0f}; {hw_star.t_sync * 1e6:.0f} between matvecs), "
              f"beta {hw.beta / 1e9:.2f} GB/s at "
              f"{calib.beta_bytes / 2**20:.0f} MiB; {tokens} steps x {rounds} rounds", flush=True)  # fmt: skip
    return calib, hw, hw_star, context


def time_interleaved(runs: dict, prompt: int, tokens: int, warmup: int, rounds: int, rank: int, first_round=None):
    """Per-step seconds and blocking syncs per step of every ``label -> (engine, devices, communicate)``.

    Configurations are interleaved over ``rounds`` so that load from other processes hits them alike. A
    one-device run (the unsharded baseline) is timed on rank 0 only, between barriers. ``communicate=False``
    times the sharded model with ``comm.enabled = False``; ``first_round(label, model)`` runs right after a
    configuration's first round, still in that state. The first round of a compiled engine compiles (in its
    untimed warm-up steps) for each communication state.
    """
    times: dict[str, list[float]] = {k: [] for k in runs}
    syncs: dict[str, float] = {}
    for r in range(rounds):
        for label, (engine, devices, communicate) in runs.items():
            if devices == 1:
                dist.barrier()
                if rank == 0:
                    t, _ = time_decode(engine, prompt, tokens, warmup, seed=r)
                    times[label] += t
                    syncs[label] = 0.0  # LocalComm counts its calls, but one process communicates nothing
                dist.barrier()
                continue
            comm = engine.model.comm
            comm.enabled = communicate
            t, s = time_decode(engine, prompt, tokens, warmup, seed=r)
            times[label] += t
            if not engine.compiled:  # inside a compiled step the counter does not count (SyncCounter)
                syncs[label] = s if communicate else 0.0  # disabled calls are counted but do no communication
            if r == 0 and first_round is not None:
                first_round(label, engine.model)
            comm.enabled = True
    return times, syncs


def main(argv: list[str] | None = None) -> int:
    args = parse_decode_args("decode latency vs the calibrated decode-time model", argv, quick_rounds=4)
    return run_distributed("benchmarks/decode.py", _run, args)


def build_engines(label: str, model, args, max_seq_len: int, devices: int) -> dict[str, tuple]:
    """``label -> (engine, devices, communicate)`` for ``model``: eager, and compiled with ``--compile``; each with
    its no-comm ceiling when sharded. The engines share the model (cast to ``--dtype`` once) and own their cache."""
    model.to(resolve_dtype(args.dtype))
    runs = {}
    for suffix, options in args.modes.items():
        engine = DecodeEngine(model, batch=args.batch, max_seq_len=max_seq_len, compile_prefill=False,
                              **options)  # only decode steps are timed  # fmt: skip
        runs[f"{label}{suffix}"] = (engine, devices, True)
        if devices > 1:
            runs[f"{label} no-comm{suffix}"] = (engine, devices, False)
    return runs


def ceiling_label(label: str) -> str:
    """The no-comm ceiling's label of a ``build_engines`` label (``"x [compiled]"`` -> ``"x no-comm [compiled]"``)."""
    base, mode = split_mode(label)
    return f"{base.removesuffix(' no-comm')} no-comm{mode}"


def _run(args, rank: int, world: int, tokens: int, rounds: int, warmup: int) -> int:
    # Every engine adds an entry to the compiled decode function's cache (and no-comm one more): lift the limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    max_seq_len = args.prompt + warmup + tokens
    cfgs = build_configs(args.model, world, max_seq_len + 8)
    mesh = ParallelDims(dp=1, lane=world, world_size=world).build_mesh("cpu")
    calib, hw, hw_star, context = calibrate_decode(cfgs["llama"], args, rank, world, tokens, rounds, warmup)

    # Build every model once (same seed on every rank: shard_model needs identical full weights).
    # Every rank holds the same labels in the same order (the collectives inside must line up); the
    # one-process baseline only has a model on rank 0.
    runs: dict[str, tuple] = {}  # label -> (engine or None, devices, communicate)
    label_cfg: dict[str, ModelConfig] = {}
    torch.manual_seed(0)
    baseline = build_model(cfgs["llama"], LocalComm()).eval() if rank == 0 else None
    for label, run in build_engines("llama (1 proc)", baseline or build_model(cfgs["llama"]), args, max_seq_len,
                                    1).items():  # fmt: skip
        runs[label] = run if rank == 0 else (None, 1, True)
        label_cfg[label] = cfgs["llama"]
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = shard_model(build_model(cfg).eval(), MeshComm(mesh), vocab_parallel_head=args.vocab_parallel)
        for label, run in build_engines("llama-TP" if name == "llama" else name, model, args, max_seq_len,
                                        world).items():  # fmt: skip
            runs[label] = run
            label_cfg[label] = cfg

    times, syncs = time_interleaved(runs, args.prompt, tokens, warmup, rounds, rank)
    figures = _figures(runs, label_cfg, times, syncs, args, hw_star, context, world, rank)
    profiles = profile_steps(runs, args.profile, args.prompt, tokens, warmup, rank)
    if rank != 0:
        return 0
    _add_ratios(figures, args.modes)
    _print_report(figures, args, hw, hw_star, world, calib, tokens, rounds)
    for label, table in profiles.items():
        print(f"\nprofile of {tokens} decode steps of {label} (rank 0; self time per op, ms over all steps):\n{table}")
    return 0


def profile_steps(runs: dict, labels: list[str], prompt: int, tokens: int, warmup: int, rank: int) -> dict[str, str]:
    """torch.profiler's per-op table of ``tokens`` decode steps of each of ``labels`` (after the timed rounds:
    compiled and warm). Every rank steps (the collectives need all of them); rank 0's table is returned."""
    from torch.profiler import profile

    tables = {}
    for label in labels:
        if label not in runs:
            raise SystemExit(f"--profile {label!r}: not a row of this run; rows: {', '.join(runs)}")
        engine, devices, communicate = runs[label]
        if devices == 1 and rank != 0:
            continue
        engine.model.comm.enabled = communicate
        prof = profile()
        time_decode(engine, prompt, tokens, warmup, around=prof)
        engine.model.comm.enabled = True
        tables[label] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return tables


def _figures(runs, label_cfg, times, syncs, args, hw_star, context, world, rank) -> dict[str, dict]:
    """Per-label measured and predicted figures (collective over the ranks; rank 0 keeps them)."""
    figures = {}
    for label, (engine, devices, communicate) in runs.items():
        # Collective on every rank: the slower rank's median / p10 (rank 0's own for the baseline).
        measured = _group_quantile(times[label], 0.5, devices)
        p10 = _group_quantile(times[label], 0.1, devices)
        if rank != 0:
            continue
        cfg = label_cfg[label]
        vp = args.vocab_parallel and devices > 1
        nbytes = pm.decode_bytes(cfg, devices=devices, context=context, batch=args.batch,
                                 precision=args.precision, vocab_parallel_head=vp).total  # fmt: skip
        n_syncs = pm.syncs_for_config(cfg, vp) if communicate and devices > 1 else 0
        eager_label = split_mode(label)[0]
        pred = pm.predict_bytes(nbytes, n_syncs, hw_star, devices, batch=args.batch)
        figures[label] = dict(
            params=total_parameters(cfg), bytes_per_rank=nbytes, devices=devices, compiled=engine.compiled,
            communicate=communicate, syncs_measured=syncs.get(eager_label, 0.0), syncs_formula=n_syncs,
            measured_s=measured, measured_p10_s=p10, tokens_per_s=args.batch / measured,
            achieved_gbs=nbytes / measured / 1e9, roofline_fraction=nbytes / hw_star.beta / measured,
            predicted_s=pred.t_decode, predicted_memory_s=pred.t_memory, config=cfg.to_dict(),
        )  # fmt: skip
    return figures


def _add_ratios(figures: dict[str, dict], modes: dict) -> None:
    """Speed-up over Llama-TP and fraction of the no-comm ceiling (same mode), and ``pred@step`` (module doc)."""
    for suffix in modes:
        tp, tp_free = figures[f"llama-TP{suffix}"], figures[f"llama-TP no-comm{suffix}"]
        t_sync_step = (tp["measured_s"] - tp_free["measured_s"]) / tp["syncs_formula"]
        for label, f in figures.items():
            if split_mode(label)[1] != suffix:
                continue
            ceiling = figures.get(ceiling_label(label))
            f["t_sync_in_step_s"] = t_sync_step
            f["speedup_vs_llama_tp"] = tp["measured_s"] / f["measured_s"]
            f["fraction_of_ceiling"] = ceiling["measured_s"] / f["measured_s"] if ceiling else None
            f["predicted_at_step_s"] = (ceiling["measured_s"] + f["syncs_formula"] * t_sync_step) if ceiling else None


def _row(label: str, f: dict) -> dict:
    at_step = f["predicted_at_step_s"]
    return {
        "config": label,
        "params": f"{f['params'] / 1e6:.1f}M",
        "MB/rank": f"{f['bytes_per_rank'] / 1e6:.1f}",
        "syncs/tok": f"{f['syncs_measured']:g}",
        "Eq.": f["syncs_formula"],
        "ms/step": f"{f['measured_s'] * 1e3:.2f}",
        "p10 ms": f"{f['measured_p10_s'] * 1e3:.2f}",
        "tok/s": f"{f['tokens_per_s']:.0f}",
        "GB/s": f"{f['achieved_gbs']:.2f}",
        "roofline": f"{f['roofline_fraction']:.2f}",
        "pred ms": f"{f['predicted_s'] * 1e3:.2f}",
        "meas/pred": f"{f['measured_s'] / f['predicted_s']:.2f}",
        "pred@step ms": f"{at_step * 1e3:.2f}" if at_step else "",
        "meas/pred@step": f"{f['measured_s'] / at_step:.2f}" if at_step else "",
        "speedup": f"{f['speedup_vs_llama_tp']:.2f}",
        "of ceiling": f"{f['fraction_of_ceiling']:.2f}" if f["fraction_of_ceiling"] else "",
    }


def _target_verdicts(figures: dict[str, dict], suffix: str) -> list[str]:
    """The issue's two targets for the one-block recipes, in the mode of ``suffix``."""
    out = []
    for name in ("sandwich-1blk", "burger-1blk"):
        f = figures[f"{name}{suffix}"]
        out.append(f"{name}{suffix}: {f['speedup_vs_llama_tp']:.2f}x Llama-TP{suffix} (target >= 3: "
                   f"{'met' if f['speedup_vs_llama_tp'] >= 3 else 'MISSED'}), {f['fraction_of_ceiling']:.2f} of its "
                   f"no-comm ceiling (target >= 0.9: {'met' if f['fraction_of_ceiling'] >= 0.9 else 'MISSED'})")
    return out


def _verdicts(figures: dict[str, dict], modes: dict) -> list[str]:
    out = ["eager: " + "; ".join(_target_verdicts(figures, ""))] if len(modes) > 1 else []
    for suffix in list(modes)[1:] or [""]:
        out += _target_verdicts(figures, suffix)
    eager = figures["llama-TP"]["measured_s"]
    for suffix in list(modes)[1:]:
        comp = figures[f"llama-TP{suffix}"]["measured_s"]
        verdict = "met" if comp < eager else "MISSED"
        out.append(f"Llama-TP{suffix} {eager / comp:.2f}x eager Llama-TP (target > 1: {verdict})")
    if " [compiled, unfrozen]" in modes:  # what inductor freezing buys, per configuration
        ratios = []
        for label, f in figures.items():
            base, suffix = split_mode(label)
            unfrozen = figures.get(f"{base} [compiled, unfrozen]")
            if suffix == " [compiled]" and unfrozen:
                ratios.append(f"{base} {unfrozen['measured_s'] / f['measured_s']:.2f}x")
        out.append("frozen compiled step vs unfrozen (speed-up): " + ", ".join(ratios))
    within = [abs(f["measured_s"] / f["predicted_at_step_s"] - 1) <= 0.15 for f in figures.values()
              if f["predicted_at_step_s"]]  # fmt: skip
    out.append(f"pred@step within 15 % of measured: {sum(within)}/{len(within)} rows")
    costs = ", ".join(f"{figures[f'llama-TP{suffix}']['t_sync_in_step_s'] * 1e6:.0f} us "
                      f"{suffix.strip(' []') or 'eager'}" for suffix in modes)  # fmt: skip
    out.append(f"sync cost inside a decode step (Llama-TP minus its no-comm ceiling, per sync): {costs}")
    return out


def _print_report(figures, args, hw, hw_star, world, calib, tokens, rounds) -> None:
    head = "vocab-parallel" if args.vocab_parallel else "replicated"
    title = (f"\ndecode, batch {args.batch}, {args.dtype}, {head} head, preset {args.preset} (depth {args.depth}, "
             f"hidden {args.hidden}, vocab {args.vocab}), {world} ranks (gloo); t_sync {hw.t_sync * 1e6:.0f} us back "
             f"to back, {hw_star.t_sync * 1e6:.0f} us between matvecs, beta {hw.beta / 1e9:.2f} GB/s (fp32 matvec), "
             f"measured in this run")  # fmt: skip
    print_table([_row(label, f) for label, f in figures.items()], title=title)
    verdicts = _verdicts(figures, args.modes)
    warning = busy_machine_warning()
    if warning:
        verdicts.append(warning)
    print("\n".join(verdicts))
    info = machine_info()
    print(f"machine: {info}")
    if args.json:
        write_json(args.json, {
            "benchmark": "decode", "world": world, "tokens": tokens, "rounds": rounds, "prompt": args.prompt,
            "preset": args.preset, "model": args.model, "batch": args.batch, "dtype": args.dtype,
            "vocab_parallel_head": args.vocab_parallel,
            "compile": args.compile, "modes": args.modes, "calibration": calib.as_dict(), "hardware": hw.__dict__,
            "hardware_in_compute": hw_star.__dict__, "results": figures, "verdicts": verdicts, "machine": info,
        })  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
