"""Train every communication schedule at matched parameters and tokens; eval losses side by side.

    python benchmarks/schedules_train.py --quick --json schedules_train.json [--decode decode_schedules.json]

Each schedule runs through the trainer exactly as ``python launch/train.py +experiment=schedule_<name>`` would
(same Hydra tree, composed in this process to save the start-up of six interpreters): matched parameters
(``conf/model/schedule_*.yaml``, one budget), the same data, tokens, optimiser, schedule and seed
(``conf/experiment/schedule_base.yaml``). The table reads each run directory with the sweeps tooling
(``tpblocks.sweeps.collect.run_row``) and adds the schedule's syncs per token from ``perfmodel``.

With ``--decode`` (the JSON of ``benchmarks/decode_schedules.py``) it also draws the quality-speed frontier:
final eval loss against measured decode latency per schedule (``tpblocks.sweeps.frontier``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from tpblocks.infer import perfmodel as pm  # noqa: E402
from tpblocks.models.schedule_flavors import SCHEDULE_NAMES  # noqa: E402


def compose(experiment: str, overrides: list[str]):
    """The Hydra config ``launch/train.py +experiment=<experiment> <overrides>`` would run."""
    from tpblocks.config import compose as compose_config

    return compose_config([f"+experiment={experiment}", *overrides])


def train_schedule(name: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train ``schedule_<name>`` into ``run_dir`` through the trainer; returns its summary."""
    from tpblocks.train import run

    cfg = compose(f"schedule_{name}", [f"run_dir={run_dir}", *overrides])
    return run(cfg)


def table_rows(runs: dict[str, Path]) -> tuple[list[dict], dict]:
    """Printed rows and JSON figures of the finished runs, read back from their directories."""
    from tpblocks.models import ModelConfig
    from tpblocks.sweeps.collect import run_row

    rows, figures = [], {}
    for name, run_dir in runs.items():
        row = run_row(run_dir)
        model = row.pop("_model", None) or {}
        cfg = ModelConfig(**{k: v for k, v in model.items() if k != "extra"}) if model else None
        blocking = pm.syncs_for_config(cfg) if cfg else None
        overlapped = pm.overlapped_syncs_for_config(cfg) if cfg else None
        figures[name] = {**row, "schedule": name, "syncs_blocking": blocking, "syncs_overlapped": overlapped,
                         "hidden_size": model.get("hidden_size")}  # fmt: skip
        loss = row.get("final_eval_loss")
        rows.append({
            "schedule": name,
            "status": row.get("status"),
            "params": f"{row['params'] / 1e6:.3f}M" if row.get("params") else "",
            "hidden": model.get("hidden_size", ""),
            "syncs/tok b+o": f"{blocking}+{overlapped}" if cfg else "",
            "tokens": row.get("tokens_seen"),
            "final train loss": f"{row['final_train_loss']:.4f}" if row.get("final_train_loss") is not None else "",
            "final eval loss": f"{loss:.4f}" if loss is not None else "",
            "wall s": f"{row['wall_s']:.0f}" if row.get("wall_s") is not None else "",
        })  # fmt: skip
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train every schedule at matched parameters; eval losses table")
    parser.add_argument("--quick", action="store_true", help="30 steps x 1024 tokens (protocol: 60 x 2048)")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps for every schedule")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULE_NAMES), choices=SCHEDULE_NAMES)
    parser.add_argument("--out", type=str, default=None, help="parent of the run directories")
    parser.add_argument("--json", type=str, default=None, help="write the table's figures here")
    parser.add_argument("--decode", type=str, default=None,
                        help="decode_schedules.py JSON: also plot loss against measured decode latency")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (key=value)")
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.quick else None)
    out = Path(args.out or REPO / "outputs" / "schedules_train" / time.strftime("%Y%m%d-%H%M%S"))
    overrides = ["wandb.mode=disabled"]
    if args.quick:  # half the tokens per step and a smaller eval set: about 1/4 of the protocol's compute
        overrides += ["train.micro_batch=8", "train.tokens_per_step=1024", "train.eval_tokens=8192"]
    overrides += args.overrides
    if steps:
        overrides += [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 3)}"]
    runs: dict[str, Path] = {}
    for name in args.schedules:
        runs[name] = out / f"schedule_{name}"
        print(f"== {name} -> {runs[name]}", flush=True)
        try:
            train_schedule(name, runs[name], overrides)
        except ValueError as err:  # a bad override: say which, keep the other schedules' rows
            print(f"error: schedule {name}: {err}", file=sys.stderr)
    rows, figures = table_rows(runs)
    print_table(rows, title=f"\neval loss at matched parameters and tokens, {len(runs)} schedules ({out})")
    info = machine_info()
    print(f"machine: {info}")
    payload = {"benchmark": "schedules_train", "overrides": overrides, "results": figures, "machine": info}
    if args.decode:
        from tpblocks.sweeps.frontier import frontier_figure, frontier_points

        points = frontier_points(list(figures.values()), args.decode)
        path = frontier_figure(points, out / "frontier.png")
        print(f"frontier plot -> {path}")
        payload["frontier"] = points
    if args.json:
        write_json(args.json, payload)
    return 0 if all(r.get("status") == "completed" for r in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
