"""Gather run directories into one results table (CSV), and the report's Eq. 12 extremum distance.

Inputs are sweep directories (their ``manifest.json`` lists every point, so failed, missing and invalid runs
appear as rows with their status instead of vanishing) or plain directories searched for run directories
(anything holding ``summary.json`` or ``metrics.jsonl``).

Row status: ``completed`` / ``failed`` / ``diverged`` (from summary.json), ``incomplete`` (metrics but no
summary: still running or killed), ``missing`` (nothing written yet: queued, or died before the trainer
started), ``invalid`` (the grid point has no valid model; ``error`` says why).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_NAME, read_manifest, read_summary

COORD_KEYS = ("recipe", "arch", "lane_count", "lane_depth", "tp_blocks", "n_classic_layers", "comm_start",
              "comm_interleave", "comm_length", "comm_reception", "broadcast_delay", "scheduler", "seed")  # fmt: skip
_SEED_TAIL = re.compile(r"_seed\d+$")  # grids.point_name puts the seed last
COLUMNS = (
    "sweep", "sweep_dir", "name", "status", *COORD_KEYS, "aspect_ratio", "hidden_size", "lane_hidden_size", "params",
    "final_train_loss", "final_eval_loss", "min_train_loss", "step", "max_steps", "tokens_seen", "wall_s", "error",
    "run_dir",
)  # fmt: skip


def config_label(name: str) -> str:
    """A run's name without its ``_seedN`` tail: the runs of one grid point that differ only by seed."""
    return _SEED_TAIL.sub("", name)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged steps of a run; a torn last line (run killed mid-write) is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_curve(run_dir: str | Path, key: str = "train_loss") -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for row in read_metrics(run_dir):
        value = row.get(key)
        if value is not None and row.get("step") is not None:
            steps.append(int(row["step"]))
            losses.append(float(value))
    return steps, losses


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_row(run_dir: str | Path) -> dict[str, Any]:
    """What a run directory says about itself (summary.json, else metrics.jsonl)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    metrics = read_metrics(run_dir)
    train = [v for v in (_finite(m.get("train_loss")) for m in metrics) if v is not None]
    evals = [v for v in (_finite(m.get("eval_loss")) for m in metrics) if v is not None]
    row: dict[str, Any] = {"run_dir": str(run_dir), "min_train_loss": min(train) if train else None}
    if summary is not None:
        row.update(
            status=summary.get("status") or "failed",
            final_train_loss=_finite(summary.get("final_train_loss")),
            final_eval_loss=_finite(summary.get("final_eval_loss")),
            step=summary.get("step"),
            tokens_seen=summary.get("tokens_seen"),
            wall_s=summary.get("wall_s"),
            params=summary.get("params"),
            error=summary.get("error"),
        )
    else:
        row["status"] = "incomplete" if metrics else "missing"
        if metrics:
            row["step"] = metrics[-1].get("step")
            row["tokens_seen"] = metrics[-1].get("tokens")
    # A summary without losses (e.g. failed after some steps) still has a curve: fall back to it.
    if row.get("final_train_loss") is None and train:
        row["final_train_loss"] = train[-1]
    if row.get("final_eval_loss") is None and evals:
        row["final_eval_loss"] = evals[-1]
    model_json = run_dir / "model_config.json"
    if model_json.is_file():
        try:
            row["_model"] = json.loads(model_json.read_text())
        except json.JSONDecodeError:
            pass
    return row


def _model_columns(model: dict[str, Any] | None) -> dict[str, Any]:
    if not model:
        return {}
    out: dict[str, Any] = {"hidden_size": model.get("hidden_size")}
    if model.get("arch") == "tp_blocks":
        h, lanes = model["hidden_size"], model["lane_count"]
        width = h // lanes if model.get("recipe") == "sandwich" else h
        out.update(lane_hidden_size=width, aspect_ratio=round(width / model["lane_depth"], 3))
        for key in ("recipe", "lane_count", "lane_depth", "n_classic_layers"):
            out[key] = model.get(key)
        out["tp_blocks"] = model.get("tp_block_repetition")
        if model.get("delayed_comm"):
            out.update(comm_start=model.get("comm_start"), comm_interleave=model.get("comm_interleave"),
                       comm_length=model.get("comm_length"), comm_reception=model.get("comm_reception"))  # fmt: skip
    elif model.get("arch") == "dtp":  # Delayed TP (Laneformer): full-width lanes, delay δ
        out.update(arch="dtp", lane_count=model.get("lane_count"), broadcast_delay=model.get("broadcast_delay"))
    else:
        out["arch"] = model.get("arch")
    return out


def is_run_dir(path: str | Path) -> bool:
    """A training run's own directory (it holds metrics.jsonl), as opposed to a sweep or a directory of runs."""
    return (Path(path) / "metrics.jsonl").is_file()


def collect(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One row per point of every sweep given (manifest order), or per run directory found."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if (path / MANIFEST_NAME).is_file() or path.name == MANIFEST_NAME:
            rows.extend(_sweep_rows(path))
        elif path.is_dir():
            for run in sorted({p.parent for pat in ("summary.json", "metrics.jsonl") for p in path.rglob(pat)}):
                row = run_row(run)
                model = row.pop("_model", None)
                rows.append({"sweep": path.name, "name": run.name, **_model_columns(model), **row})
        else:
            raise ValueError(f"{path} is neither a sweep directory (with {MANIFEST_NAME}) nor a directory of runs")
    return rows


def _sweep_rows(path: Path) -> list[dict[str, Any]]:
    manifest = read_manifest(path)
    max_steps = manifest.scale.get("tokens", 0) // max(1, manifest.scale.get("tokens_per_step", 1)) or None
    rows = []
    for task in manifest.tasks:
        row = run_row(task.run_dir)
        row.pop("_model", None)  # the manifest's solved model is the one asked for
        rows.append({
            "sweep": manifest.sweep, "sweep_dir": manifest.sweep_dir, "name": task.name,
            **_model_columns(task.model), **task.coords, "params": task.n_params, "max_steps": max_steps,
            **{k: v for k, v in row.items() if v is not None},
        })  # fmt: skip
    for point in manifest.invalid:
        rows.append({"sweep": manifest.sweep, "sweep_dir": manifest.sweep_dir, "name": point.name,
                     "status": "invalid", **point.coords, "error": point.reason})  # fmt: skip
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for r in rows for k in r if k not in COLUMNS and not k.startswith("_")})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- Eq. 12
def extremum_distance(group_a: Sequence[float], group_b: Sequence[float]) -> float:
    """Report Eq. 12: ``-(min(max_A, max_B) - max(min_A, min_B))``.

    Positive = the two groups' [min, max] loss ranges do not overlap (the value is the gap between them);
    negative = they overlap by that much. Symmetric in A and B.
    """
    if not group_a or not group_b:
        raise ValueError("extremum_distance needs at least one value in each group")
    return -(min(max(group_a), max(group_b)) - max(min(group_a), min(group_b)))


def extremum_distance_curve(
    curves_a: Sequence[tuple[Sequence[int], Sequence[float]]],
    curves_b: Sequence[tuple[Sequence[int], Sequence[float]]],
) -> tuple[list[int], list[float]]:
    """Eq. 12 at every step logged by *all* runs of both groups (Fig. 17d)."""
    all_curves = [*curves_a, *curves_b]
    if not curves_a or not curves_b:
        return [], []
    common = set(all_curves[0][0])
    for steps, _ in all_curves[1:]:
        common &= set(steps)
    lookup_a = [dict(zip(s, v)) for s, v in curves_a]
    lookup_b = [dict(zip(s, v)) for s, v in curves_b]
    steps = sorted(common)
    return steps, [extremum_distance([d[s] for d in lookup_a], [d[s] for d in lookup_b]) for s in steps]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of the non-empty columns (what ``launch/report.py`` prints)."""
    if not rows:
        return "(no runs)"
    keep = [
        c
        for c in (columns or ("name", "status", "params", "final_train_loss", "final_eval_loss", "step", "error"))
        if any(r.get(c) not in (None, "") for r in rows)
    ]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        text = "" if v is None else str(v)
        return text if len(text) <= 60 else text[:57] + "..."

    table = [keep] + [[cell(r.get(c)) for c in keep] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keep))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
