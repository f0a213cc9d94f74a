"""Run-directory outputs: metrics.jsonl, summary.json, config files, and the optional wandb mirror.

Only rank 0 creates these objects. ``metrics.jsonl`` holds one JSON object per logged step
({"step", "lr", "train_loss", "tokens", "tokens_per_s", "elapsed_s"} + "eval_loss" on eval steps, + "grad_norm").
On resume, lines after the checkpoint's step are dropped first, so an interrupted-then-resumed run ends with the
same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays parseable by strict readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write (temp + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in data.items()}, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (skips a torn last line left by a killed process)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """Appends step records to metrics.jsonl and mirrors them to wandb when a run is active."""

    def __init__(self, run_dir: Path, resume_step: int | None, wandb_run: Any = None):
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = wandb_run
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()  # a SIGKILL must not lose logged steps: the resume test compares this file
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self._file.close()


def init_wandb(cfg: Any, run_dir: Path, config_dict: dict) -> Any:
    """A wandb run for rank 0, or None for ``wandb.mode=disabled`` (wandb is then never imported).

    Offline runs land in ``<run_dir>/wandb/`` (``wandb sync <run_dir>/wandb/offline-run-*`` uploads them later).
    Online mode without credentials fails fast with wandb's own message, which says how to log in.
    """
    if cfg.mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name,
        tags=list(cfg.tags),
        mode=cfg.mode,
        dir=str(run_dir),
        config=config_dict,
    )
