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

from .collect import config_label, extremum_distance_curve, loss_curve  # noqa: E402

LOSS = "final_train_loss"  # the report's figures; launch/report.py --loss eval plots final_eval_loss instead
LOSS_LABELS = {"final_train_loss": "final training loss", "final_eval_loss": "final held-out loss"}
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


def _ok(row: dict[str, Any], loss: str = LOSS) -> bool:
    return row.get("status") == "completed" and isinstance(row.get(loss), (int, float)) and math.isfinite(row[loss])


def _label_axes(ax, x_label: str, y_label: str, title: str, *, legend: bool = True) -> None:
    """Axis labels, title and a light grid; a legend when ``legend`` and some line carries a label."""
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend()


def _not_plotted_note(fig: plt.Figure, rows: Sequence[dict[str, Any]], loss: str = LOSS) -> None:
    names = [r.get("name") for r in rows]

    def label(r: dict[str, Any]) -> str:  # several sweeps in one figure may reuse a point name
        dup = names.count(r.get("name")) > 1 and r.get("sweep_dir")
        return f"{Path(r['sweep_dir']).name}/{r['name']}" if dup else str(r.get("name"))

    missing = [f"{label(r)} ({r.get('status', '?')})" for r in rows if not _ok(r, loss)]
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


def line_figure(rows: Sequence[dict[str, Any]], sweep: str, path: str | Path, loss: str = LOSS) -> Path:
    """Loss vs one grid axis, a line per recipe; a Llama point (no lanes) is drawn as a dashed baseline.
    Seeds of one point are averaged, their min-max drawn as an error bar (a band for the baseline)."""
    x_key, x_label, title, log2 = _LINE_FIGURES[sweep]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    series: dict[str, dict[float, list[tuple[float, dict]]]] = defaultdict(lambda: defaultdict(list))
    baselines: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if not _ok(row, loss):
            continue
        recipe = row.get("recipe") or row.get("arch") or "run"
        if recipe == "llama" or row.get(x_key) in (None, ""):
            baselines[recipe].append(float(row[loss]))
            continue
        series[recipe][float(row[x_key])].append((float(row[loss]), row))
    for recipe, losses in sorted(baselines.items()):
        mean, n = sum(losses) / len(losses), len(losses)
        label = f"{recipe} baseline ({mean:.3f}" + (f", n={n})" if n > 1 else ")")
        ax.axhline(mean, ls="--", color=COLORS["llama"], label=label)
        if n > 1:
            ax.axhspan(min(losses), max(losses), color=COLORS["llama"], alpha=0.15)
    for recipe, by_x in sorted(series.items()):
        xs = sorted(by_x)
        ys = [sum(v for v, _ in by_x[x]) / len(by_x[x]) for x in xs]
        low = [y - min(v for v, _ in by_x[x]) for x, y in zip(xs, ys)]
        high = [max(v for v, _ in by_x[x]) - y for x, y in zip(xs, ys)]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, color=COLORS.get(recipe), label=recipe)
        for x, y in zip(xs, ys):
            row = by_x[x][0][1]
            note = f"D{row['lane_depth']}" if sweep == "aspect_ratio" and row.get("lane_depth") else f"{y:.3f}"
            if len(by_x[x]) > 1:
                note += f" (n={len(by_x[x])})"
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if log2:
        ax.set_xscale("log", base=2)
    xs_all = sorted({x for by_x in series.values() for x in by_x})
    if xs_all and sweep != "aspect_ratio":
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
    ax.margins(x=0.08, y=0.15)  # room for the value labels above the points
    if loss != LOSS:
        title = title.replace("training loss", LOSS_LABELS.get(loss, loss).removeprefix("final "))
    _label_axes(ax, x_label, LOSS_LABELS.get(loss, loss), title)
    _not_plotted_note(fig, rows, loss)
    return _save(fig, path)


def delayed_figure(rows: Sequence[dict[str, Any]], path: str | Path, loss: str = LOSS, subtitle: str = "") -> Path:
    """Fig. 22 as heatmaps: one panel per communication start, interleave x length cells coloured by loss
    (a readable stand-in for the report's 3-D scatter); invalid / failed cells are labelled as such."""
    starts = sorted({int(r["comm_start"]) for r in rows if r.get("comm_start") not in (None, "")})
    inters = sorted({int(r["comm_interleave"]) for r in rows if r.get("comm_interleave") not in (None, "")})
    lengths = sorted({int(r["comm_length"]) for r in rows if r.get("comm_length") not in (None, "")})
    losses = [float(r[loss]) for r in rows if _ok(r, loss)]
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
            if _ok(r, loss):
                grid[i][j] = float(r[loss])
                bright = (float(r[loss]) - vmin) / (vmax - vmin) > 0.6 if vmax > vmin else False  # viridis: yellow
                ax.text(j, i, f"{float(r[loss]):.3f}", ha="center", va="center", fontsize=8,
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
        fig.colorbar(image, ax=list(axes[0]), label=LOSS_LABELS.get(loss, loss), shrink=0.85)
    fig.suptitle("Fig. 22b: delayed communication (start x interleave x length)" + subtitle)
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


Curve = tuple[list[int], list[float]]


def seed_band_figure(groups: dict[str, list[Curve]], path: str | Path, title: str, rows=()) -> Path:
    """Training loss per group: the mean over its seeds, with the min/max band (Fig. 17b)."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, curves in sorted(groups.items()):
        common = sorted(set.intersection(*(set(s) for s, _ in curves)))
        if not common:
            continue
        per_step = [[dict(zip(s, v))[t] for s, v in curves] for t in common]
        mean = [sum(v) / len(v) for v in per_step]
        line = ax.plot(common, mean, lw=1.2, label=f"{label} (n={len(curves)})")[0]
        if len(curves) > 1:
            ax.fill_between(common, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(),
                            alpha=0.2)  # fmt: skip
    _label_axes(ax, "step", "training loss", title)
    _not_plotted_note(fig, rows)
    return _save(fig, path)


def extremum_figure(pairs: Sequence[tuple[str, list[Curve], list[Curve]]], path: str | Path, title: str) -> Path:
    """Eq. 12 over steps for each (label, group A, group B) (Fig. 17d); > 0: the groups do not overlap."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, a, b in pairs:
        steps, dist = extremum_distance_curve(a, b)
        if steps:
            ax.plot(steps, dist, lw=1.2, label=label)
    ax.axhline(0.0, color="black", lw=0.8)
    _label_axes(ax, "step", "extremum distance (Eq. 12)", title + "\n(> 0: the two groups do not overlap)")
    return _save(fig, path)


def _curves_by(rows: Sequence[dict[str, Any]], key) -> dict[str, list[Curve]]:
    groups: dict[str, list[Curve]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "completed" and row.get("run_dir"):
            curve = loss_curve(row["run_dir"])
            if curve[0]:
                groups[key(row)].append(curve)
    return groups


def seed_variance_figures(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Fig. 17b (mean and min/max band per arch x scheduler) and Fig. 17d (Eq. 12 distance per scheduler)."""
    groups = _curves_by(rows, lambda r: f"{r.get('arch')} / {r.get('scheduler')}")
    paths = [seed_band_figure(groups, out_dir / "fig17b_seed_variance.png", "Fig. 17b: mean and min/max over seeds",
                              rows)]  # fmt: skip
    archs = sorted({g.split(" / ")[0] for g in groups})
    scheds = sorted({g.split(" / ")[1] for g in groups}) if len(archs) >= 2 else []
    a, b = (archs + ["", ""])[:2]
    pairs = [(f"{s}: {a} vs {b}", groups.get(f"{a} / {s}", []), groups.get(f"{b} / {s}", [])) for s in scheds]
    title = "Fig. 17d: distance between the groups' loss extremums"
    paths.append(extremum_figure(pairs, out_dir / "fig17d_extremum_distance.png", title))
    return paths


def lane_seed_figures(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Loss curves of every lane-count configuration (seeds averaged, min/max band) and, where two or more
    configurations have 2+ seeds, Eq. 12 between each pair of them (Llama first): Fig. 17d on this grid."""
    groups = _curves_by(rows, lambda r: config_label(str(r.get("name"))))
    paths = [seed_band_figure(groups, out_dir / "fig18_lane_count_curves.png",
                              "Lane-count grid: training loss (mean, min/max over seeds)", rows)]  # fmt: skip
    multi = sorted((g for g, c in groups.items() if len(c) > 1), key=lambda g: (g != "llama", g))
    pairs = [(f"{a} vs {b}", groups[a], groups[b]) for i, a in enumerate(multi) for b in multi[i + 1 :]]
    if pairs:
        title = "Fig. 17d on the lane-count grid: extremum distance over seeds"
        paths.append(extremum_figure(pairs, out_dir / "fig17d_lane_count_extremum.png", title))
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


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path, loss: str = LOSS) -> list[Path]:
    """Every figure that applies to the sweeps present in ``rows``; returns the PNG paths. ``loss`` is the
    column the final-loss figures plot (curves are always the logged training loss)."""
    out_dir = Path(out_dir)
    by_sweep: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_sweep[str(row.get("sweep"))].append(row)
    paths: list[Path] = []
    for sweep, group in by_sweep.items():
        if sweep in FIGURE_NAMES:
            paths.append(line_figure(group, sweep, out_dir / FIGURE_NAMES[sweep], loss))
            if sweep == "lane_count" and any(r.get("seed") not in (None, "") for r in group):
                paths.extend(lane_seed_figures(group, out_dir))
        elif sweep == "delayed_comm":
            paths.extend(delayed_figures(group, out_dir, loss))
            paths.append(curves_figure(group, out_dir / "fig22a_delayed_curves.png", "Fig. 22a: training losses"))
        elif sweep == "seed_variance":
            paths.extend(seed_variance_figures(group, out_dir))
        else:
            paths.append(curves_figure(group, out_dir / f"{sweep}_curves.png", f"{sweep}: training losses"))
    return paths


def delayed_figures(rows: Sequence[dict[str, Any]], out_dir: Path, loss: str = LOSS) -> list[Path]:
    """Fig. 22b, one figure per reception when the sweep has several (they would share heatmap cells)."""
    by_reception: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_reception[str(row.get("comm_reception") or "gated")].append(row)
    if len(by_reception) == 1:
        return [delayed_figure(rows, out_dir / "fig22b_delayed_comm.png", loss)]
    return [delayed_figure(group, out_dir / f"fig22b_delayed_comm_{rec}.png", loss, f" ({rec} reception)")
            for rec, group in sorted(by_reception.items())]  # fmt: skip
