"""One sweep task, as run by a Slurm array element or a submitit job.

Command line (used by ``launch/slurm/sweep_array.sbatch``)::

    python -m tpblocks.sweeps.task argv MANIFEST INDEX        # training script, then one override per line
    python -m tpblocks.sweeps.task finalize MANIFEST INDEX --exit-code RC [--log FILE]
    python -m tpblocks.sweeps.task run MANIFEST INDEX [--nproc-per-node N]   # launch + finalize, one node

``run`` is what the submitit backend calls (through ``run_task``): it launches the training on the current
node (plain ``python`` for one process, ``torchrun --standalone`` for several), writes the output to
``<sweep_dir>/logs/<index>_<name>.log`` and finalizes the run directory so a crash is recorded as failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .manifest import Manifest, finalize_task, read_manifest


def repo_root(manifest: Manifest) -> Path:
    """The checkout that submitted the sweep (training scripts are resolved against it)."""
    return Path(manifest.extra.get("repo") or Path.cwd())


def entry_path(manifest: Manifest) -> Path:
    entry = Path(manifest.entry)
    return entry if entry.is_absolute() else repo_root(manifest) / entry


def task_argv(manifest: Manifest, index: int) -> list[str]:
    """Training script followed by the task's overrides."""
    task = manifest.task(index)
    return [str(entry_path(manifest)), *task.overrides]


def task_log(manifest: Manifest, index: int) -> Path:
    return Path(manifest.sweep_dir) / "logs" / f"{index:03d}_{manifest.task(index).name}.log"


def run_task(manifest_file: str | Path, index: int, nproc_per_node: int = 1) -> int:
    """Train task ``index`` of a sweep on this node and finalize its run directory; returns the exit code."""
    manifest = read_manifest(manifest_file)
    argv = task_argv(manifest, index)
    if nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        launcher = [sys.executable]
    env = dict(os.environ)
    if "SLURM_CPUS_PER_TASK" in env and "OMP_NUM_THREADS" not in env:
        # As in sweep_array.sbatch: threads = allocated cores / processes, not every core of a shared node.
        env["OMP_NUM_THREADS"] = str(max(1, int(env["SLURM_CPUS_PER_TASK"]) // nproc_per_node))
    log = task_log(manifest, index)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write("$ " + " ".join([*launcher, *argv]) + "\n")
        out.flush()
        proc = subprocess.run(
            [*launcher, *argv], cwd=repo_root(manifest), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    finalize_task(manifest, index, proc.returncode, log)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpblocks.sweeps.task", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("argv", "finalize", "run"):
        p = sub.add_parser(name)
        p.add_argument("manifest")
        p.add_argument("index", type=int)
        if name == "finalize":
            p.add_argument("--exit-code", type=int, required=True)
            p.add_argument("--log", default=None)
        if name == "run":
            p.add_argument("--nproc-per-node", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.manifest)
        if args.cmd == "argv":
            print("\n".join(task_argv(manifest, args.index)))
            return 0
        if args.cmd == "finalize":
            summary = finalize_task(manifest, args.index, args.exit_code, args.log)
            print(f"task {args.index} ({manifest.task(args.index).name}): {summary.get('status')}")
            return 0
        return run_task(args.manifest, args.index, args.nproc_per_node)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
