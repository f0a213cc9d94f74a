"""PNG figures like the report's Fig. 17-22, drawn from the rows of ``tpblocks.sweeps.collect``.

Every figure plots the final training loss of the *completed* runs and lists, under the axes, the points that
are not on it (failed, diverged, missing, invalid) with their status -- a hole in a curve is always explained.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from .collect import extremum_distance_curve, loss_curve  # noqa: E402

LOSS = "final_train_loss"
COLORS = {"sandwich": "tab:blue", "burger": "tab:orange", "llama": "tab:gray"}
_LINE_FIGURES = {  # sweep -> (x column, x label, title, log2 x axis)
    "lane_count": ("lane_count", "number of lanes", "Fig. 18: training loss vs number of lanes", True),
    "aspect_ratio": ("aspect_ratio", "lane aspect ratio (lane width / lane depth)",
                     "Fig. 19: training loss vs lane aspect ratio", True),
    "tp_blocks": ("tp_blocks", "number of TP blocks (lane depth x blocks constant)",
                  "Fig. 20: training loss vs number of TP blocks", False),
    "classic_layers": ("n_classic_layers", "classic decoder layers after each TP block",
                       "Fig. 21: training loss vs classic layers per block", False),
}  # fmt: skip


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "completed" and isinstance(row.get(LOSS), (int, float)) and math.isfinite(row[LOSS])


def _label_axes(ax, x_label: str, y_label: str, title: str, *, legend: bool = True) -> None:
    """Axis labels, title and a light grid; a legend when ``legend`` and some line carries a label."""
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend()


def _not_plotted_note(fig: plt.Figure, rows: Sequence[dict[str, Any]]) -> None:
    names = [r.get("name") for r in rows]

    def label(r: dict[str, Any]) -> str:  # several sweeps in one figure may reuse a point name
        dup = names.count(r.get("name")) > 1 and r.get("sweep_dir")
        return f"{Path(r['sweep_dir']).name}/{r['name']}" if dup else str(r.get("name"))

    missing = [f"{label(r)} ({r.get('status', '?')})" for r in rows if not _ok(r)]
    if not missing:
        return
    text = "not plotted: " + ", ".join(missing)
    lines, line = [], ""
    for word in text.split(" "):  # wrap by hand: fig.text has no width limit
        if len(line) + len(word) > 110:
            lines.append(line)
            line = ""
        line += word + " "
    lines.append(line)
    fig.text(0.01, 0.01, "\n".join(lines[:4]) + (" ..." if len(lines) > 4 else ""), fontsize=8, color="firebrick",
             va="bottom")  # fmt: skip
    fig.subplots_adjust(bottom=0.14 + 0.03 * min(len(lines), 4))


def line_figure(rows: Sequence[dict[str, Any]], sweep: str, path: str | Path) -> Path:
    """Loss vs one grid axis, a line per recipe; a Llama point (no lanes) is drawn as a dashed baseline."""
    x_key, x_label, title, log2 = _LINE_FIGURES[sweep]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    series: dict[str, list[tuple[float, float, dict]]] = defaultdict(list)
    for row in rows:
        if not _ok(row):
            continue
        recipe = row.get("recipe") or row.get("arch") or "run"
        if recipe == "llama" or row.get(x_key) in (None, ""):
            ax.axhline(row[LOSS], ls="--", color=COLORS["llama"], label=f"{recipe} baseline ({row[LOSS]:.3f})")
            continue
        series[recipe].append((float(row[x_key]), float(row[LOSS]), row))
    for recipe, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "o-", color=COLORS.get(recipe), label=recipe)
        for x, y, row in pts:
            note = f"D{row['lane_depth']}" if sweep == "aspect_ratio" and row.get("lane_depth") else f"{y:.3f}"
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if log2:
        ax.set_xscale("log", base=2)
    xs_all = sorted({p[0] for pts in series.values() for p in pts})
    if xs_all and sweep != "aspect_ratio":
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
    ax.margins(x=0.08, y=0.15)  # room for the value labels above the points
    _label_axes(ax, x_label, "final training loss", title)
    _not_plotted_note(fig, rows)
    return _save(fig, path)


def delayed_figure(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Fig. 22 as heatmaps: one panel per communication start, interleave x length cells coloured by loss
    (a readable stand-in for the report's 3-D scatter); invalid / failed cells are labelled as such."""
    starts = sorted({int(r["comm_start"]) for r in rows if r.get("comm_start") not in (None, "")})
    inters = sorted({int(r["comm_interleave"]) for r in rows if r.get("comm_interleave") not in (None, "")})
    lengths = sorted({int(r["comm_length"]) for r in rows if r.get("comm_length") not in (None, "")})
    losses = [float(r[LOSS]) for r in rows if _ok(r)]
    vmin, vmax = (min(losses), max(losses)) if losses else (0.0, 1.0)
    fig, axes = plt.subplots(1, max(1, len(starts)), figsize=(4.2 * max(1, len(starts)) + 1, 4.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    image = None
    for ax, start in zip(axes[0], starts):
        grid = [[math.nan] * len(lengths) for _ in inters]
        for r in rows:
            if r.get("comm_start") in (None, "") or int(r["comm_start"]) != start:
                continue
            i, j = inters.index(int(r["comm_interleave"])), lengths.index(int(r["comm_length"]))
            if _ok(r):
                grid[i][j] = float(r[LOSS])
                bright = (float(r[LOSS]) - vmin) / (vmax - vmin) > 0.6 if vmax > vmin else False  # viridis: yellow
                ax.text(j, i, f"{float(r[LOSS]):.3f}", ha="center", va="center", fontsize=8,
                        color="black" if bright else "white")  # fmt: skip
            else:
                ax.text(j, i, str(r.get("status", "?")), ha="center", va="center", fontsize=7,
                        color="firebrick" if r.get("status") != "invalid" else "dimgray")  # fmt: skip
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-6, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(inters)), [str(i) for i in inters])
        ax.set_xlabel("communication length")
        ax.set_ylabel("communication interleave")
        ax.set_title(f"start = {start}")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="final training loss", shrink=0.85)
    fig.suptitle("Fig. 22b: delayed communication (start x interleave x length)")
    return _save(fig, path, tight=False)


def curves_figure(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Training-loss curves of every run that logged any (Fig. 22a, Fig. 16-style)."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    drawn = 0
    for row in rows:
        if not row.get("run_dir"):
            continue
        steps, losses = loss_curve(row["run_dir"])
        if steps:
            ax.plot(steps, losses, lw=1, label=row["name"] if len(rows) <= 12 else None)
            drawn += 1
    _label_axes(ax, "step", "training loss", title, legend=False)
    if drawn and len(rows) <= 12:
        ax.legend(fontsize=7)
    _not_plotted_note(fig, rows)
    return _save(fig, path)


def seed_variance_figures(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Fig. 17b (mean and min/max band per arch x scheduler) and Fig. 17d (Eq. 12 distance per scheduler)."""
    groups: dict[tuple[str, str], list[tuple[list[int], list[float]]]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "completed" and row.get("run_dir"):
            curve = loss_curve(row["run_dir"])
            if curve[0]:
                groups[(str(row.get("arch")), str(row.get("scheduler")))].append(curve)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (arch, sched), curves in sorted(groups.items()):
        common = sorted(set.intersection(*(set(s) for s, _ in curves)))
        if not common:
            continue
        per_step = [[dict(zip(s, v))[t] for s, v in curves] for t in common]
        mean = [sum(v) / len(v) for v in per_step]
        line = ax.plot(common, mean, lw=1.5, label=f"{arch} / {sched} (n={len(curves)})")[0]
        ax.fill_between(common, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(),
                        alpha=0.2)  # fmt: skip
    _label_axes(ax, "step", "training loss", "Fig. 17b: mean and min/max over seeds")
    _not_plotted_note(fig, rows)
    paths = [_save(fig, out_dir / "fig17b_seed_variance.png")]

    fig, ax = plt.subplots(figsize=(7.5, 5))
    archs = sorted({a for a, _ in groups})
    for sched in sorted({s for _, s in groups}):
        if len(archs) < 2:
            break
        steps, dist = extremum_distance_curve(groups.get((archs[0], sched), []), groups.get((archs[1], sched), []))
        if steps:
            ax.plot(steps, dist, lw=1.5, label=f"{sched}: {archs[0]} vs {archs[1]}")
    ax.axhline(0.0, color="black", lw=0.8)
    title = "Fig. 17d: distance between the groups' loss extremums\n(> 0: the two groups do not overlap)"
    _label_axes(ax, "step", "extremum distance (Eq. 12)", title)
    paths.append(_save(fig, out_dir / "fig17d_extremum_distance.png"))
    return paths


def _save(fig: plt.Figure, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return path


FIGURE_NAMES = {
    "lane_count": "fig18_lane_count.png",
    "aspect_ratio": "fig19_aspect_ratio.png",
    "tp_blocks": "fig20_tp_blocks.png",
    "classic_layers": "fig21_classic_layers.png",
}


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Every figure that applies to the sweeps present in ``rows``; returns the PNG paths."""
    out_dir = Path(out_dir)
    by_sweep: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_sweep[str(row.get("sweep"))].append(row)
    paths: list[Path] = []
    for sweep, group in by_sweep.items():
        if sweep in FIGURE_NAMES:
            paths.append(line_figure(group, sweep, out_dir / FIGURE_NAMES[sweep]))
        elif sweep == "delayed_comm":
            paths.append(delayed_figure(group, out_dir / "fig22b_delayed_comm.png"))
            paths.append(curves_figure(group, out_dir / "fig22a_delayed_curves.png", "Fig. 22a: training losses"))
        elif sweep == "seed_variance":
            paths.extend(seed_variance_figures(group, out_dir))
        else:
            paths.append(curves_figure(group, out_dir / f"{sweep}_curves.png", f"{sweep}: training losses"))
    return paths
