"""The quality-speed frontier: eval loss of each communication schedule against its measured decode latency.

Joins two outputs by schedule name:
  * training rows (``launch/report.py`` run directories, or ``benchmarks/schedules_train.py --json`` results):
    ``final_eval_loss`` and the schedule, read from the row or from ``<run_dir>/model_config.json``
    (``extra.schedule``, set by ``tpblocks.models.schedule_flavors``; else derived from arch / recipe);
  * ``benchmarks/decode_schedules.py --json``: the measured batch-1 latency of the same schedule, and of its
    no-communication ceiling.

    python launch/report.py outputs/schedules_train/<stamp> --decode decode_schedules.json

The two need not be at the same scale (a tiny model trains on CPU in minutes; latency is measured at a size
where weights dominate): the plot pairs each schedule's quality with its speed, and says which sizes it paired.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _schedule_of(model: dict[str, Any]) -> str | None:
    extra = model.get("extra") or {}
    if extra.get("schedule"):
        return str(extra["schedule"])
    arch = model.get("arch")
    if arch == "tp_blocks":
        return "track" if model.get("recipe") == "track" else model.get("recipe")
    return arch


def row_schedule(row: dict[str, Any]) -> str | None:
    """The schedule a training row belongs to (its own field, else its run directory's model_config.json)."""
    if row.get("schedule"):
        return str(row["schedule"])
    path = Path(str(row.get("run_dir", ""))) / "model_config.json"
    if path.is_file():
        try:
            return _schedule_of(json.loads(path.read_text()))
        except json.JSONDecodeError:
            return None
    return None


def read_decode(path: str | Path) -> dict[str, dict[str, Any]]:
    """schedule -> {"measured_s", "ceiling_s", "params", ...} from a decode_schedules.py JSON."""
    payload = json.loads(Path(path).read_text())
    if payload.get("benchmark") != "decode_schedules":
        raise ValueError(f"{path} is not a benchmarks/decode_schedules.py --json output (benchmark field)")
    out: dict[str, dict[str, Any]] = {}
    for fig in payload["results"].values():
        entry = out.setdefault(fig["schedule"], {})
        if fig["communicate"]:
            entry.update(measured_s=fig["measured_s"], predicted_s=fig["predicted_s"], decode_params=fig["params"])
        else:
            entry["ceiling_s"] = fig["measured_s"]
    return out


def frontier_points(rows: Sequence[dict[str, Any]], decode_json: str | Path) -> list[dict[str, Any]]:
    """One point per schedule with both a finite eval loss and a measured latency (best loss if several runs)."""
    decode = read_decode(decode_json)
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        name, loss = row_schedule(row), row.get("final_eval_loss")
        if name is None or loss is None or name not in decode or "measured_s" not in decode[name]:
            continue
        loss = float(loss)
        if name not in best or loss < best[name]["eval_loss"]:
            best[name] = {"schedule": name, "eval_loss": loss, "train_params": row.get("params"), **decode[name]}
    points = sorted(best.values(), key=lambda p: p["measured_s"])
    floor = float("inf")
    for p in points:  # Pareto: no faster schedule has a lower loss
        p["on_frontier"] = p["eval_loss"] < floor
        floor = min(floor, p["eval_loss"])
    return points


def frontier_figure(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Scatter of eval loss vs measured decode latency, the Pareto front joined, ceilings as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if not points:
        ax.text(0.5, 0.5, "no schedule has both an eval loss and a decode latency", ha="center", transform=ax.transAxes)
    for p in points:
        ms = p["measured_s"] * 1e3
        ax.scatter([ms], [p["eval_loss"]], color="C0" if p["on_frontier"] else "C7", zorder=3)
        ax.annotate(p["schedule"], (ms, p["eval_loss"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if p.get("ceiling_s"):
            ax.scatter([p["ceiling_s"] * 1e3], [p["eval_loss"]], facecolors="none", edgecolors="C3", zorder=2)
    front = [p for p in points if p["on_frontier"]]
    ax.plot([p["measured_s"] * 1e3 for p in front], [p["eval_loss"] for p in front], color="C0", lw=1)
    sizes = sorted({f"{p['decode_params'] / 1e6:.1f}M" for p in points if p.get("decode_params")})
    trained = sorted({f"{p['train_params'] / 1e6:.2f}M" for p in points if p.get("train_params")})
    ax.set_xlabel(f"measured batch-1 decode latency, ms (models of {', '.join(sizes) or '?'})")
    ax.set_ylabel(f"final eval loss (models of {', '.join(trained) or '?'})")
    ax.set_title("quality-speed frontier of the communication schedules (open red: no-comm ceiling)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
