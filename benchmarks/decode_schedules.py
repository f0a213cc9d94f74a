"""Batch-1 decode of every communication schedule at matched parameters, measured vs the calibrated decode model.

    torchrun --standalone --nproc_per_node=2 benchmarks/decode_schedules.py --quick --json decode_schedules.json

Schedules (``tpblocks.models.schedule_flavors``), all of the same sequential depth and parameter count:
Llama-TP (2 syncs/layer), PaLM parallel layers (1/layer), Ladder residual (2/layer, asynchronous), Kraken
(1 gather + L-1 asynchronous lane sums), Parallel Track (1 per D layers), a Burger TP block (1), Delayed TP /
Laneformer (2 per present layer + 1, 2 asynchronous per later layer) — each also
with ``comm.enabled = False``: the same sharded model with every collective removed (its no-communication
ceiling). In one run:
  1. calibrate t_sync (small all-reduce) and beta (matvec read, both ranks at once) on this machine;
  2. time cached decode steps, configurations interleaved over rounds (the slower rank's median is kept);
  3. count syncs per token twice: ``comm.counter`` (what the model asks) and ``CollectiveAudit`` (what reaches
     torch.distributed), and predict each from ``perfmodel``: bytes per rank / beta + blocking syncs x t_sync +
     the exposed part of the overlapped ones (``pred ms``; ``pred ms no-ovl`` charges them a full t_sync,
     which is what gloo on a shared CPU gives, see TOOLCHAIN.md §3); ``pred* ms`` uses the sync cost measured
     between matvecs (``calibrate``'s in-compute t_sync) instead of back-to-back all-reduces.
Timing, warm-up, the group median and the decode engines (``--compile`` adds compiled rows, ``--dtype``,
``--batch``) are ``benchmarks/decode.py``'s own functions, and its defaults (hidden 384, short rounds interleaved
over every configuration).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import busy_machine_warning, machine_info, print_table, write_json  # noqa: E402
from benchmarks.decode import (  # noqa: E402
    _group_quantile,
    build_engines,
    calibrate_decode,
    ceiling_label,
    parse_decode_args,
    run_distributed,
    split_mode,
    time_interleaved,
)
from tpblocks.infer import perfmodel as pm  # noqa: E402
from tpblocks.models import ModelConfig, build_model, total_parameters  # noqa: E402
from tpblocks.models.schedule_flavors import SCHEDULE_NAMES, schedule_config  # noqa: E402
from tpblocks.parallel import CollectiveAudit, MeshComm, ParallelDims, shard_model  # noqa: E402

LABELS = {"llama": "llama-TP", "palm": "palm", "ladder": "ladder", "kraken": "kraken", "track": "track",
          "burger": "burger (TP block)", "dtp": "dtp (Laneformer)"}  # fmt: skip


def build_configs(preset: dict, degree: int, track_depth: int, max_seq_len: int):
    """The preset's Llama (``benchmarks.decode.PRESETS``) and every other schedule re-cut at its parameter count."""
    base = ModelConfig(arch="llama", vocab_size=preset["vocab"], hidden_size=preset["hidden"],
                       n_heads=preset["n_heads"], n_kv_heads=preset["n_kv_heads"], ffn_factor=preset["ffn_factor"],
                       n_layers=preset["depth"], max_seq_len=max_seq_len,
                       tie_embeddings=preset["tie"])  # fmt: skip
    return {name: schedule_config(name, base, degree=degree, track_depth=track_depth) for name in SCHEDULE_NAMES}


@torch.no_grad()
def audited_step(model) -> tuple[int, int, int, int]:
    """(blocking, overlapped, collectives, async collectives) of one decode token after a 4-token prompt."""
    cache = model.new_cache(8)
    model(torch.zeros(1, 4, dtype=torch.long), cache)
    model.comm.counter.reset()
    with CollectiveAudit() as audit:
        model(torch.zeros(1, 1, dtype=torch.long), cache)
    c = model.comm.counter
    return c.blocking, c.overlapped, audit.total, audit.async_ops


def main(argv: list[str] | None = None) -> int:
    def track_depth(parser) -> None:
        parser.add_argument("--track-depth", type=int, default=4, help="Parallel Track: layers between two syncs")

    args = parse_decode_args("batch-1 decode of every communication schedule vs the model", argv, quick_rounds=3,
                             extra=track_depth)  # fmt: skip
    return run_distributed("benchmarks/decode_schedules.py", _run, args)


def _run(args, rank: int, world: int, tokens: int, rounds: int, warmup: int) -> int:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)  # one entry per engine
    max_seq_len = args.prompt + warmup + tokens
    cfgs = build_configs(args.model, world, args.track_depth, max_seq_len + 8)
    mesh = ParallelDims(dp=1, lane=world, world_size=world).build_mesh("cpu")
    calib, hw, hw_star, context = calibrate_decode(cfgs["llama"], args, rank, world, tokens, rounds, warmup)

    runs: dict[str, tuple] = {}  # label -> (schedule, cfg, engine, communicate)
    for name, cfg in cfgs.items():
        torch.manual_seed(0)  # identical full weights on every rank: shard_model slices them
        model = shard_model(build_model(cfg).eval(), MeshComm(mesh))
        for label, (engine, _, communicate) in build_engines(LABELS[name], model, args, max_seq_len, world).items():
            runs[label] = (name, cfg, engine, communicate)

    counted: dict[str, tuple] = {}

    def audit(label: str, model) -> None:
        counted[label] = audited_step(model)

    timed = {label: (engine, world, communicate) for label, (_, _, engine, communicate) in runs.items()}
    times, _ = time_interleaved(timed, args.prompt, tokens, warmup, rounds, rank, first_round=audit)

    figures = {}
    precision = args.precision
    for label, (name, cfg, engine, communicate) in runs.items():
        measured = _group_quantile(times[label], 0.5, world)
        blocking, overlapped, collectives, async_ops = counted[split_mode(label)[0]]
        kw = dict(devices=world, context=context, precision=precision, batch=args.batch)
        pred = pm.predict(cfg, hw, communicate=communicate, **kw)
        pred_star = pm.predict(cfg, hw_star, communicate=communicate, **kw)
        no_overlap = pred.t_decode
        if communicate and pm.charges_overlapped(cfg):
            no_overlap = pred.t_memory + pred.t_sync_total - pm.exposed_overlapped_time(
                cfg, hw, devices=world, precision=precision
            ) + pm.exposed_overlapped_time(cfg, hw, devices=world, precision=precision, hides=False)  # fmt: skip
        figures[label] = dict(
            schedule=name, communicate=communicate, compiled=engine.compiled, params=total_parameters(cfg),
            devices=world, bytes_per_rank=pm.decode_bytes(cfg, devices=world, context=context, precision=precision,
                                                          batch=args.batch).total,
            syncs_blocking_measured=blocking, syncs_overlapped_measured=overlapped,
            collectives_measured=collectives, async_collectives_measured=async_ops,
            syncs_blocking_formula=pm.syncs_for_config(cfg) if communicate else 0,
            syncs_overlapped_formula=pm.overlapped_syncs_for_config(cfg) if communicate else 0,
            measured_s=measured, predicted_s=pred.t_decode, predicted_no_overlap_s=no_overlap,
            predicted_in_compute_s=pred_star.t_decode,
            predicted_memory_s=pred.t_memory, config=cfg.to_dict(),
        )  # fmt: skip
    if rank != 0:
        return 0

    rows = []
    for label, f in figures.items():
        tp = figures[f"llama-TP{split_mode(label)[1]}"]
        base, base_pred = tp["measured_s"], tp["predicted_s"]
        ceiling = figures[ceiling_label(label)]
        f["speedup_vs_llama_tp"] = base / f["measured_s"]
        f["predicted_speedup_vs_llama_tp"] = base_pred / f["predicted_s"]
        f["fraction_of_ceiling"] = ceiling["measured_s"] / f["measured_s"]
        counted_syncs = f"{f['syncs_blocking_measured']}+{f['syncs_overlapped_measured']}"
        if not f["communicate"]:
            counted_syncs = f"({counted_syncs})"  # counted calls, none reached the backend
        rows.append({
            "config": label,
            "params": f"{f['params'] / 1e6:.2f}M",
            "syncs/tok b+o": counted_syncs,
            "formula": f"{f['syncs_blocking_formula']}+{f['syncs_overlapped_formula']}",
            "collectives/tok": f["collectives_measured"],
            "meas ms": f"{f['measured_s'] * 1e3:.2f}",
            "pred ms": f"{f['predicted_s'] * 1e3:.2f}",
            "pred ms no-ovl": f"{f['predicted_no_overlap_s'] * 1e3:.2f}",
            "pred* ms": f"{f['predicted_in_compute_s'] * 1e3:.2f}",
            "meas/pred": f"{f['measured_s'] / f['predicted_s']:.2f}",
            "speedup": f"{f['speedup_vs_llama_tp']:.2f}",
            "pred speedup": f"{f['predicted_speedup_vs_llama_tp']:.2f}",
            "of ceiling": f"{f['fraction_of_ceiling']:.2f}",
        })  # fmt: skip
    print_table(rows, title=(
        f"\ndecode (batch {args.batch}, {args.dtype}), every schedule at {figures['llama-TP']['params'] / 1e6:.1f}M "
        f"parameters, depth {args.depth}, {world} ranks (gloo) (t_sync {hw.t_sync * 1e6:.0f} us, "
        f"beta {hw.beta / 1e9:.2f} GB/s measured in this run); syncs b+o = blocking + overlapped per token"
    ))  # fmt: skip
    warning = busy_machine_warning()
    if warning:
        print(warning)
    info = machine_info()
    print(f"machine: {info}")
    if args.json:
        write_json(args.json, {
            "benchmark": "decode_schedules", "world": world, "tokens": tokens, "rounds": rounds,
            "prompt": args.prompt, "calibration": calib.as_dict(), "hardware": hw.__dict__,
            "hardware_in_compute": hw_star.__dict__, "results": figures, "warning": warning,
            "machine": info,
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
