"""Command lines behind ``launch/slurm/submit.py`` (submit a whole sweep) and ``launch/report.py`` (table + plots).

Submit (one command per sweep)::

    python launch/slurm/submit.py sweep_lane_count                     # conf/experiment/sweep_lane_count.yaml
    python launch/slurm/submit.py lane_count --scale tiny --set lane_count=1,2,4 --set recipe=sandwich --wait
    python launch/slurm/submit.py delayed_comm --scale paper --nodes 4 --gpus-per-node 8 --partition gpu

Report::

    python launch/report.py outputs/sweeps/lane_count_tiny_20260101-120000 [more sweep or run dirs] [--out DIR]
    python launch/report.py <run_dir> [more run dirs]      # only runs: each one's loss_curve.png
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# The report needs neither torch nor the grids: those are imported by the submit path only.
from .collect import collect, format_table, is_run_dir, write_csv
from .findings import write_findings
from .manifest import DEFAULT_ENTRY, REPO

EXPERIMENT_DIR = REPO / "conf" / "experiment"


def load_sweep_yaml(name: str) -> dict[str, Any]:
    """The ``sweep:`` section of ``conf/experiment/<name>.yaml`` (grid, scale, knobs, values, overrides)."""
    from omegaconf import OmegaConf

    path = EXPERIMENT_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENT_DIR.glob("sweep_*.yaml"))
        raise ValueError(f"no sweep named {name!r}: {path} does not exist; known: {', '.join(known) or 'none'}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    section = raw.get("sweep") if isinstance(raw, dict) else None
    if not isinstance(section, dict) or "grid" not in section:
        raise ValueError(f"{path} has no 'sweep:' section with a 'grid:' key")
    return section


def _knob_items(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--knob {item!r} must look like NAME=VALUE (e.g. budget=135e6)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def submit_parser() -> argparse.ArgumentParser:
    from .grids import GRIDS, SCALES
    from .submit import BACKENDS

    p = argparse.ArgumentParser(prog="launch/slurm/submit.py", description="Submit a whole §6 sweep.")
    p.add_argument("sweep", help=f"a grid ({', '.join(GRIDS)}) or a conf/experiment/sweep_*.yaml name")
    p.add_argument("--scale", choices=sorted(SCALES), help="knob preset (default: the YAML's, else tiny)")
    p.add_argument("--knob", action="append", default=[], metavar="K=V", help="scale knob, e.g. budget=135e6")
    p.add_argument("--set", action="append", default=[], metavar="AXIS=V1,V2", help="restrict/replace grid axis values")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VAL", help="extra Hydra override, all runs")
    p.add_argument("--backend", choices=BACKENDS, default="sbatch")
    p.add_argument("--hydra-launcher", default="slurm", help="hydra backend: slurm | submitit_local")
    p.add_argument("--sweep-dir", help="default: outputs/sweeps/<grid>_<scale>_<date-time>")
    p.add_argument("--entry", default=None, help=f"training script (default {DEFAULT_ENTRY})")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-gb", type=int, default=None)
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--max-parallel", type=int, default=None, help="array throttle: at most N tasks at once")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch flag, verbatim (repeatable)")
    p.add_argument("--rerun", action="store_true",
                   help="SWEEP is an existing sweep directory whose arrays have ended: submit again its tasks that did "
                   "not complete (sbatch)")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="with --rerun: just these tasks")
    p.add_argument("--dry-run", action="store_true", help="write the manifest and print the submit command only")
    p.add_argument("--wait", action="store_true", help="block until every task has ended")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="--wait limit in seconds")
    p.add_argument("--report", action="store_true", help="after --wait, write the CSV and plots")
    return p


def submit_main(argv: list[str] | None = None) -> int:
    args = submit_parser().parse_args(argv)
    try:
        return _submit(args)
    except (ValueError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _resources(args: argparse.Namespace):
    from .submit import SlurmResources

    return SlurmResources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        time=args.time, partition=args.partition, account=args.account, max_parallel=args.max_parallel,
        extra=tuple(args.sbatch_arg),
    )  # fmt: skip


def _rerun(args: argparse.Namespace) -> int:
    """Resubmit the unfinished (or ``--only``) tasks of an existing sweep, same manifest, same run dirs."""
    from .manifest import read_manifest
    from .submit import submit_sbatch, unfinished_tasks, wait_for_array

    if args.backend != "sbatch":
        raise ValueError("--rerun submits through sbatch only")
    manifest = read_manifest(args.sweep)
    indices = unfinished_tasks(manifest, [n for item in args.only for n in item.split(",") if n])
    if not indices:
        print(f"every task of {manifest.sweep_dir} completed: nothing to rerun")
        return 0
    names = ", ".join(manifest.tasks[i].name for i in indices)
    res = _resources(args)
    if args.dry_run:
        print(submit_sbatch(manifest, res, dry_run=True, indices=indices))
        return 0
    job = submit_sbatch(manifest, res, indices=indices)
    print(f"resubmitted {len(indices)} task(s) of {manifest.sweep_dir} as array job {job}: {names}")
    if args.wait:
        wait_for_array(job, args.timeout)
    return 0


def _submit(args: argparse.Namespace) -> int:
    if args.rerun:
        return _rerun(args)
    from .grids import GRIDS, expand, get_scale, parse_values
    from .manifest import build_manifest
    from .submit import (
        hydra_command,
        run_hydra,
        run_local,
        submit_sbatch,
        submit_submitit,
        wait_for_array,
        with_repo,
    )

    spec: dict[str, Any] = {"grid": args.sweep}
    if args.sweep not in GRIDS:
        spec = load_sweep_yaml(args.sweep)
    grid = spec["grid"]
    scale_name = args.scale or spec.get("scale", "tiny")
    knobs = {**{k: str(v) for k, v in (spec.get("knobs") or {}).items()}, **_knob_items(args.knob)}
    scale = get_scale(scale_name, **knobs)
    values = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in (spec.get("values") or {}).items()}
    values.update(parse_values(args.set))
    overrides = [*(spec.get("overrides") or []), *args.override]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(args.sweep_dir or Path("outputs") / "sweeps" / f"{grid}_{scale.name}_{stamp}")
    points = expand(grid, scale, values)
    manifest = with_repo(build_manifest(
        grid, scale, points, sweep_dir, extra_overrides=overrides, entry=args.entry or spec.get("entry", DEFAULT_ENTRY)
    ))  # fmt: skip
    manifest.write()
    res = _resources(args)
    print(f"sweep {grid} at scale {scale.name}: {len(manifest.tasks)} runs, {len(manifest.invalid)} invalid points")
    for point in manifest.invalid:
        print(f"  invalid {point.name}: {point.reason}")
    print(f"manifest: {manifest.path}")
    if manifest.extra.get("dirty"):
        # Seen with tens of queued runs: each task imports the checkout when it *starts*, so edits made
        # while the array waits change the later runs without any trace in their configs.
        print(f"warning: {manifest.extra['repo']} has uncommitted changes; queued tasks import the code when they "
              "start, so keep the checkout unchanged until the sweep ends (or submit from a clean copy)")  # fmt: skip
    if args.dry_run:
        if args.backend == "sbatch":
            print(submit_sbatch(manifest, res, dry_run=True))
        elif args.backend == "hydra":
            print(shlex.join(hydra_command(manifest, res, args.hydra_launcher)))
        return 0
    if args.backend == "sbatch":
        job = submit_sbatch(manifest, res)
        print(f"submitted array job {job} ({len(manifest.tasks)} tasks); logs in {Path(manifest.sweep_dir) / 'slurm'}")
        if args.wait:
            wait_for_array(job, args.timeout)
    elif args.backend == "submitit":
        jobs = submit_submitit(manifest, res)
        print(f"submitted {len(jobs)} submitit jobs: {', '.join(j.job_id for j in jobs)}")
        if args.wait:
            for job in jobs:
                job.result()  # the task's exit code; failures are recorded in its run directory
    elif args.backend == "hydra":
        rc = run_hydra(manifest, res, args.hydra_launcher)
        print(f"hydra multirun exited {rc}")
        args.wait = True
    else:
        codes = run_local(manifest, res.procs_per_node)
        print(f"local run: {sum(c == 0 for c in codes)}/{len(codes)} tasks exited 0")
    if args.report and (args.wait or args.backend == "local"):
        return report_main([manifest.sweep_dir])
    print(f"report: python launch/report.py {manifest.sweep_dir}")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/report.py", description="Gather run directories into a CSV and plots.")
    p.add_argument("paths", nargs="+", help="sweep directories (with manifest.json), directories of runs, or runs")
    p.add_argument("--out", default=None, help="output directory (default: <first path>/report; a run's: itself)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--loss", choices=("train", "eval"), default="train",
                   help="final loss of the figures and findings.md: training (the report's) or held-out")  # fmt: skip
    p.add_argument("--decode", default=None, help="benchmarks/decode_schedules.py JSON: plot loss vs decode latency")
    args = p.parse_args(argv)
    if all(is_run_dir(path) for path in args.paths):
        return _run_curves(args.paths, args.out)
    try:
        rows = collect(args.paths)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.paths[0]) / "report")
    csv_path = write_csv(rows, out / "results.csv")
    print(format_table(rows))
    print(f"\n{len(rows)} rows -> {csv_path}")
    loss = f"final_{args.loss}_loss"
    print(f"findings -> {write_findings(rows, out / 'findings.md', loss)}")
    if not args.no_plots:
        from .plots import plot_sweep

        for path in plot_sweep(rows, out, loss):
            print(f"plot -> {path}")
    if args.decode:  # quality-speed frontier of the communication schedules (tpblocks/sweeps/frontier.py)
        from .frontier import frontier_figure, frontier_points

        try:
            print(f"plot -> {frontier_figure(frontier_points(rows, args.decode), out / 'frontier.png')}")
        except (OSError, ValueError, KeyError) as err:
            print(f"error: --decode {args.decode}: {err!r}", file=sys.stderr)
            return 2
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("status", "?")] = counts.get(row.get("status", "?"), 0) + 1
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def _run_curves(paths: list[str], out: str | None) -> int:
    """Run directories only: each one's loss curve (into the run dir, or ``--out/<run name>_loss_curve.png``)."""
    from tpblocks.train.run_report import CURVE_NAME, plot_run  # the trainer's own plot (imports torch)

    for path in map(Path, paths):
        target = Path(out) / f"{path.resolve().name}_{CURVE_NAME}" if out else None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        try:
            print(f"plot -> {plot_run(path, target)}")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0
