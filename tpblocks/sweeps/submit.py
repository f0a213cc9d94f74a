"""Submitting a sweep: a Slurm job array (``sbatch``), submitit jobs, or plain local processes.

All three run the same thing per point -- the manifest task of that index -- so a sweep's results look the
same whichever way it was executed:

* ``sbatch``: one job array, ``launch/slurm/sweep_array.sbatch``; each element launches torchrun on each of
  its nodes with rendezvous from the Slurm allocation (multi-node capable).
* ``submitit``: ``submitit.AutoExecutor`` (Slurm when ``sbatch`` is on the PATH, else local processes);
  each job runs ``tpblocks.sweeps.task.run_task`` on one node (torchrun ``--standalone`` for several GPUs).
* ``hydra``: ``launch/train.py -m`` with ``hydra/launcher=slurm`` (hydra-submitit-launcher). Each point becomes
  an option of a generated config group ``tpb_point`` (``<sweep_dir>/hydra_conf/tpb_point/<name>.yaml``), so
  the multirun sweeps ``+tpb_point=<name>,<name>,...`` -- the same override sets, one Slurm array, one process
  per job. Blocks until the jobs end (that is how the Hydra launcher works).
* ``local``: the tasks one after another in this process's machine, no scheduler.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .manifest import REPO, Manifest
from .task import run_task

SBATCH_SCRIPT = REPO / "launch" / "slurm" / "sweep_array.sbatch"
BACKENDS = ("sbatch", "submitit", "hydra", "local")
CONF_DIR = REPO / "conf"
POINT_GROUP = "tpb_point"


@dataclass(frozen=True, kw_only=True)
class SlurmResources:
    """Per-task resources. Paper scale (§5.3.2): 4-6 nodes x 8 GPUs per run; tiny scale: 1 CPU."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU: one training process per node
    cpus_per_task: int = 1
    mem_gb: int | None = None
    time: str = "04:00:00"  # HH:MM:SS per task
    partition: str | None = None
    account: str | None = None
    max_parallel: int | None = None  # array throttle (%N); None = as many as the cluster allows
    extra: tuple[str, ...] = ()  # more sbatch flags, verbatim

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} must be >= 0")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"max_parallel={self.max_parallel} must be >= 1 (or unset)")
        parts = self.time.split(":")
        if not (1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)):
            raise ValueError(f"time={self.time!r} must look like HH:MM:SS")

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def timeout_min(self) -> int:
        parts = [int(p) for p in self.time.split(":")]
        while len(parts) < 3:
            parts.insert(0, 0)
        return max(1, parts[0] * 60 + parts[1] + (1 if parts[2] else 0))


def sbatch_command(manifest: Manifest, res: SlurmResources, indices: Sequence[int] | None = None) -> list[str]:
    """The sbatch command line that submits the whole sweep (or the tasks ``indices``) as one job array."""
    n = len(manifest.tasks)
    if n == 0:
        raise ValueError(f"sweep {manifest.sweep!r} has no valid point to submit (all {len(manifest.invalid)} invalid)")
    if indices is not None and not indices:
        raise ValueError(f"no task of sweep {manifest.sweep!r} to submit")
    for i in indices or ():
        manifest.task(i)  # raises on an index outside the sweep
    spec = f"0-{n - 1}" if indices is None else ",".join(str(i) for i in sorted(set(indices)))
    array = spec + (f"%{res.max_parallel}" if res.max_parallel else "")
    export = {
        "TPB_MANIFEST": str(manifest.path),
        "TPB_PYTHON": sys.executable,
        "TPB_NPROC_PER_NODE": str(res.procs_per_node),
    }
    cmd = [
        "sbatch", "--parsable", f"--array={array}", f"--job-name=tpb-{manifest.sweep}",
        f"--output={Path(manifest.sweep_dir) / 'slurm' / '%A_%a.out'}", f"--chdir={manifest.extra.get('repo', REPO)}",
        f"--nodes={res.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={res.cpus_per_task}", f"--time={res.time}",
        "--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items()),
    ]  # fmt: skip
    if res.gpus_per_node:
        cmd.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.mem_gb:
        cmd.append(f"--mem={res.mem_gb}G")
    if res.partition:
        cmd.append(f"--partition={res.partition}")
    if res.account:
        cmd.append(f"--account={res.account}")
    return [*cmd, *res.extra, str(SBATCH_SCRIPT)]


def submit_sbatch(
    manifest: Manifest, res: SlurmResources, dry_run: bool = False, indices: Sequence[int] | None = None
) -> str:
    """Submit the array; returns the array job id (or the command, shell-quoted, when ``dry_run``)."""
    cmd = sbatch_command(manifest, res, indices)
    if dry_run:
        return shlex.join(cmd)
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on the PATH: run on a Slurm login node, or use --backend submitit/local")
    (Path(manifest.sweep_dir) / "slurm").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_submitit(manifest: Manifest, res: SlurmResources, cluster: str | None = None) -> list[Any]:
    """Submit every task as a submitit job array; returns the submitit jobs (``job.result()`` = exit code)."""
    import submitit

    if res.nodes != 1:
        raise ValueError(
            f"nodes={res.nodes}: the submitit backend trains on one node per task; use --backend sbatch for multi-node"
        )
    executor = submitit.AutoExecutor(folder=Path(manifest.sweep_dir) / "submitit", cluster=cluster)
    params: dict[str, Any] = dict(
        name=f"tpb-{manifest.sweep}", timeout_min=res.timeout_min, nodes=1, tasks_per_node=1,
        cpus_per_task=res.cpus_per_task,
    )  # fmt: skip
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if executor.cluster == "slurm":
        if res.partition:
            params["slurm_partition"] = res.partition
        if res.account:
            params["slurm_account"] = res.account
        if res.max_parallel:
            params["slurm_array_parallelism"] = res.max_parallel
    executor.update_parameters(**params)
    indices = list(range(len(manifest.tasks)))
    return executor.map_array(
        run_task, [str(manifest.path)] * len(indices), indices, [res.procs_per_node] * len(indices)
    )


def _point_config(overrides: Sequence[str]) -> dict[str, Any]:
    """Hydra command-line overrides -> the equivalent ``# @package _global_`` config (group choices become
    ``override /group: option`` entries of its defaults list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config: dict[str, Any] = {}
    defaults: list[dict[str, str]] = []
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        key, value = ov.key_or_group, ov.value()
        if "." not in key and (CONF_DIR / key).is_dir():
            defaults.append({f"override /{key}": value})
            continue
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"defaults": defaults, **config} if defaults else config


def write_hydra_points(manifest: Manifest) -> Path:
    """One ``tpb_point/<name>.yaml`` per task; returns the config dir to pass as ``--config-dir``."""
    import yaml

    conf_dir = Path(manifest.sweep_dir) / "hydra_conf"
    group = conf_dir / POINT_GROUP
    group.mkdir(parents=True, exist_ok=True)
    for task in manifest.tasks:
        body = yaml.safe_dump(_point_config(task.overrides), sort_keys=False)
        (group / f"{task.name}.yaml").write_text(f"# @package _global_\n# {manifest.sweep} point {task.index}\n{body}")
    return conf_dir


def hydra_command(manifest: Manifest, res: SlurmResources, launcher: str = "slurm") -> list[str]:
    """``launch/train.py -m`` over every point with hydra-submitit-launcher (``slurm`` or ``submitit_local``)."""
    from .task import entry_path

    if res.nodes != 1 or res.gpus_per_node > 1:
        raise ValueError("the hydra backend runs one process per job; use --backend sbatch for multi-GPU/multi-node")
    conf_dir = write_hydra_points(manifest)
    cmd = [
        sys.executable, str(entry_path(manifest)), "-m", "--config-dir", str(conf_dir),
        f"+{POINT_GROUP}=" + ",".join(t.name for t in manifest.tasks), f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={Path(manifest.sweep_dir) / 'hydra'}", f"hydra.launcher.timeout_min={res.timeout_min}",
        f"hydra.launcher.cpus_per_task={res.cpus_per_task}",
    ]  # fmt: skip
    if res.gpus_per_node:
        cmd.append(f"hydra.launcher.gpus_per_node={res.gpus_per_node}")
    if res.mem_gb:
        cmd.append(f"hydra.launcher.mem_gb={res.mem_gb}")
    if launcher != "submitit_local":
        if res.partition:
            cmd.append(f"hydra.launcher.partition={res.partition}")
        if res.account:
            cmd.append(f"hydra.launcher.account={res.account}")
        if res.max_parallel:
            cmd.append(f"hydra.launcher.array_parallelism={res.max_parallel}")
    return cmd


def run_hydra(manifest: Manifest, res: SlurmResources, launcher: str = "slurm") -> int:
    """Run the Hydra multirun (blocking); finalize every task afterwards so crashes show up as failed."""
    from .manifest import finalize_task, read_summary

    proc = subprocess.run(hydra_command(manifest, res, launcher), cwd=manifest.extra.get("repo", REPO))
    for task in manifest.tasks:
        summary = read_summary(task.run_dir)
        if summary is None or summary.get("status") not in ("completed", "failed", "diverged"):
            finalize_task(manifest, task.index, 1, None)
    return proc.returncode


def run_local(manifest: Manifest, procs_per_node: int = 1) -> list[int]:
    """Run every task here, one after another (no scheduler); returns the exit codes."""
    return [run_task(manifest.path, i, procs_per_node) for i in tqdm(range(len(manifest.tasks)), desc="sweep")]


def unfinished_tasks(manifest: Manifest, only: Sequence[str] = ()) -> list[int]:
    """Indices of the tasks to submit again: those named in ``only``, else every one not ``completed``
    (failed, diverged, killed, cancelled before it started)."""
    from .manifest import read_summary

    names = {t.name: t.index for t in manifest.tasks}
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"no task named {', '.join(unknown)} in sweep {manifest.sweep_dir}; tasks: {', '.join(names)}")
    if only:
        return [names[n] for n in only]
    return [t.index for t in manifest.tasks if (read_summary(t.run_dir) or {}).get("status") != "completed"]


def wait_for_array(job_id: str, timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until no element of array ``job_id`` is queued or running (polls ``squeue``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True)
        # squeue forgets finished jobs after MinJobAge; an unknown id therefore also means "done".
        if proc.returncode != 0 or not proc.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"array {job_id} still has jobs after {timeout_s:.0f} s:\n{proc.stdout.strip()}")
        time.sleep(poll_s)


def git_state(repo: Path) -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it; {} outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain", "-uno").strip())}
    except (OSError, subprocess.CalledProcessError):
        return {}


def with_repo(manifest: Manifest) -> Manifest:
    """Record the submitting checkout (and its commit), so tasks find the training script wherever they run and
    the results say which code trained them."""
    extra = {**manifest.extra, "repo": str(REPO), "submit_cwd": os.getcwd(), **git_state(REPO)}
    return manifest.replace(extra=extra)
