"""A sweep on disk: ``<sweep_dir>/manifest.json`` lists every point and the run directory it trains into.

The manifest is the single hand-off between the three parties of a sweep:

* ``launch/slurm/submit.py`` expands a grid (``tpblocks.sweeps.grids``) and writes it;
* each Slurm array task (``launch/slurm/sweep_array.sbatch``) or submitit job reads *its* override set by
  index (``SLURM_ARRAY_TASK_ID``) through ``python -m tpblocks.sweeps.task``;
* ``launch/report.py`` reads it back to gather every run directory -- including the ones that failed, never
  started or were invalid -- into one table.

Array indices cover the valid points only (an invalid point has no model to train); invalid points are kept
in the manifest with their reason so the report can show the hole in the grid.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grids imports the model zoo (torch); array tasks only read manifests
    from .grids import Scale, SweepPoint

REPO = Path(__file__).resolve().parents[2]  # the checkout this code runs from
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_ENTRY = "launch/train.py"


@dataclass(frozen=True, kw_only=True)
class Task:
    """One array task: a valid grid point and the exact command-line overrides of its training run."""

    index: int
    name: str
    coords: dict[str, Any]
    overrides: tuple[str, ...]
    run_dir: str
    n_params: int
    model: dict[str, Any]  # ModelConfig.to_dict() of the solved model (the report reads widths from it)


@dataclass(frozen=True, kw_only=True)
class InvalidPoint:
    name: str
    coords: dict[str, Any]
    reason: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    sweep: str  # grid name (lane_count, delayed_comm, ...)
    scale: dict[str, Any]
    sweep_dir: str
    entry: str = DEFAULT_ENTRY  # training script, relative to the repository root or absolute
    created: str = ""
    tasks: tuple[Task, ...] = ()
    invalid: tuple[InvalidPoint, ...] = ()
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version != MANIFEST_VERSION:
            raise ValueError(
                f"manifest version {self.version} is not {MANIFEST_VERSION}; re-create the sweep with this code"
            )
        for i, task in enumerate(self.tasks):
            if task.index != i:
                raise ValueError(f"manifest task {task.name!r} has index {task.index}, expected {i}")

    @property
    def path(self) -> Path:
        return Path(self.sweep_dir) / MANIFEST_NAME

    def task(self, index: int) -> Task:
        if not 0 <= index < len(self.tasks):
            raise ValueError(
                f"array index {index} is outside this sweep's {len(self.tasks)} tasks (0-{len(self.tasks) - 1}); "
                f"was the job submitted with a different --array range?"
            )
        return self.tasks[index]

    def write(self) -> Path:
        """Atomic write, so an array task never reads half a manifest."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(self.path)
        return self.path

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def manifest_path(path: str | Path) -> Path:
    """Accept a sweep directory or the manifest file itself."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(path: str | Path) -> Manifest:
    path = manifest_path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a sweep manifest; pass the sweep directory written by launch/slurm/submit.py")
    raw = json.loads(path.read_text())
    raw["tasks"] = tuple(Task(**{**t, "overrides": tuple(t["overrides"])}) for t in raw.get("tasks", ()))
    raw["invalid"] = tuple(InvalidPoint(**p) for p in raw.get("invalid", ()))
    return Manifest(**raw)


def build_manifest(
    sweep: str,
    scale: Scale,
    points: Sequence[SweepPoint],
    sweep_dir: str | Path,
    *,
    extra_overrides: Sequence[str] = (),
    entry: str = DEFAULT_ENTRY,
) -> Manifest:
    """Turn grid points into tasks: model overrides + training overrides + ``run_dir`` (+ user extras last,
    so they win)."""
    from .grids import model_overrides

    sweep_dir = Path(sweep_dir).resolve()
    tasks, invalid = [], []
    for point in points:
        if not point.valid:
            invalid.append(InvalidPoint(name=point.name, coords=point.coords, reason=point.invalid_reason or "?"))
            continue
        run_dir = sweep_dir / "runs" / point.name
        overrides = (
            *model_overrides(point.model),
            *point.train_overrides,
            f"run_dir={run_dir}",
            *extra_overrides,
        )
        tasks.append(Task(
            index=len(tasks), name=point.name, coords=point.coords, overrides=tuple(overrides),
            run_dir=str(run_dir), n_params=int(point.n_params), model=point.model.to_dict(),
        ))  # fmt: skip
    return Manifest(
        sweep=sweep,
        scale=dataclasses.asdict(scale),
        sweep_dir=str(sweep_dir),
        entry=entry,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        tasks=tuple(tasks),
        invalid=tuple(invalid),
    )


# ---------------------------------------------------------------------------------------------- run status
TERMINAL = ("completed", "failed", "diverged")


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # half-written by a killed process: treat as absent


# Lines written by the launchers around the trainer (srun, slurmstepd, torchrun's elastic agent, glog-style
# torch warnings, traceback frames): they say *that* it failed, never why.
_LAUNCHER_NOISE = re.compile(
    r"^(srun: |slurmstepd: |[EWI]\d{4} \d\d:|torch\.distributed\.elastic|Traceback|File \"|\[\d+\]:|[=-]{10})"
)
_ERROR_LINE = re.compile(r"^(error: |[\w.]*(Error|Exception)\b)|Error: ")


def _last_error_line(log: Path | None) -> str | None:
    """The most telling line of a job log: the last error the trainer printed, not the launchers' echo of it."""
    if log is None or not log.is_file():
        return None
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not _LAUNCHER_NOISE.match(ln)]
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line[-500:]
    return lines[-1][-500:] if lines else None


def finalize_task(manifest: Manifest, index: int, exit_code: int, log: str | Path | None = None) -> dict[str, Any]:
    """After the training process of ``index`` exited: make sure its run directory says how it ended.

    The trainer writes ``summary.json`` itself (also on failure, best effort). When it could not -- killed,
    crashed at import, bad override rejected before the run directory existed -- we write a ``failed`` summary
    naming the exit code and the log's last error line, so the report lists the task as failed instead of
    silently missing it.
    """
    task = manifest.task(index)
    summary = read_summary(task.run_dir)
    log_path = Path(log) if log else None
    if exit_code == 0 and summary is not None and summary.get("status") in TERMINAL:
        return summary
    if exit_code != 0 and summary is not None and summary.get("status") in ("failed", "diverged"):
        return summary
    reason = (
        f"training exited with code {exit_code}" if exit_code != 0 else "training exited 0 without a final summary"
    )
    detail = _last_error_line(log_path)
    summary = {
        **(summary or {}),
        "status": "failed",
        "error": f"{reason}: {detail}" if detail else reason,
        "exit_code": exit_code,
        "log": str(log_path) if log_path else None,
        "finalized_by": "tpblocks.sweeps.task",
    }
    run_dir = Path(task.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(run_dir / "summary.json")
    return summary
