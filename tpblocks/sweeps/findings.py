"""The report's §6 findings checked against a set of finished sweeps: "finding -- reproduced? -- evidence".

Runs that differ only by seed form one *configuration* (``burger_L4_seed0..2`` -> ``burger_L4``); its loss is
the mean over seeds, and its seed spread (max - min) is what a difference must exceed to count. Where a
configuration has a single seed, the spread used is the largest one measured on any configuration of the
same sweeps (the grids are run with 3 seeds at one point only), and the verdict says so.

The loss compared is a column of the rows: the final held-out (eval) loss by default -- the same held-out
tokens for every run, so paired across configurations -- or the final training loss (the report's figures).

Verdicts: ``yes`` (direction as in the report and every difference larger than the spread), ``no`` (the
opposite direction, beyond the spread), ``too small to decide`` (a difference within the spread; the
direction is said), ``mixed`` (differences of both signs), ``not run`` (missing runs).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .collect import config_label, extremum_distance, extremum_distance_curve, loss_curve


@dataclass(frozen=True, kw_only=True)
class Config:
    """All completed seeds of one grid point."""

    label: str
    losses: tuple[float, ...]  # final loss per seed
    run_dirs: tuple[str, ...]
    metric: str  # final_eval_loss | final_train_loss

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def spread(self) -> float:
        return max(self.losses) - min(self.losses)

    def text(self) -> str:
        n = len(self.losses)
        return f"{self.mean:.3f}" + (f" ± {self.spread / 2:.3f} (n={n})" if n > 1 else "")


@dataclass(frozen=True, kw_only=True)
class Finding:
    finding: str  # what the report says, with its figure
    verdict: str
    evidence: str


def configurations(rows: Sequence[dict[str, Any]], loss: str = "final_eval_loss") -> dict[str, Config]:
    """Completed runs with a finite ``loss``, grouped by name without its ``_seedN`` tail."""
    groups: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for row in rows:
        value = row.get(loss)
        if row.get("status") == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
            groups[config_label(str(row.get("name")))].append((float(value), str(row.get("run_dir", ""))))
    return {
        label: Config(label=label, losses=tuple(v for v, _ in vals), run_dirs=tuple(d for _, d in vals), metric=loss)
        for label, vals in groups.items()
    }


def seed_spread(configs: dict[str, Config]) -> tuple[float, str]:
    """The largest measured seed spread and where it was measured (inf when no configuration has 2+ seeds)."""
    multi = [c for c in configs.values() if len(c.losses) > 1]
    if not multi:  # nothing can be decided: every difference is "within" an unknown spread
        return math.inf, "no configuration has more than one seed: spread unmeasured"
    worst = max(multi, key=lambda c: c.spread)
    return worst.spread, f"largest seed spread {worst.spread:.3f} ({worst.label}, n={len(worst.losses)})"


def _margin(a: Config, b: Config, fallback: float) -> float:
    """The spread a difference between ``a`` and ``b`` must exceed: the larger of the two sides', each its own
    when measured (2+ seeds), else the fallback (an unmeasured side is assumed as noisy as the worst measured)."""
    return max(c.spread if len(c.losses) > 1 else fallback for c in (a, b))


def _verdict(diffs: Sequence[float], margins: Sequence[float]) -> str:
    """``diffs`` > 0 is the report's direction; each must exceed its margin (the seed spread) to count."""
    if all(d > m for d, m in zip(diffs, margins)):
        return "yes"
    if all(d < -m for d, m in zip(diffs, margins)):
        return "no"
    if all(d > 0 for d in diffs):
        return "too small to decide (direction as reported, within seed spread)"
    if all(d < 0 for d in diffs):
        return "too small to decide (opposite direction, within seed spread)"
    return "mixed"


def lane_count_finding(configs: dict[str, Config], recipe: str, fallback: float) -> Finding:
    """Fig. 18: more lanes -> higher loss."""
    by_lanes = {int(m.group(1)): c for label, c in configs.items() if (m := re.fullmatch(rf"{recipe}_L(\d+)", label))}
    other = configs.get(f"{'burger' if recipe == 'sandwich' else 'sandwich'}_L1")
    if 1 not in by_lanes and other is not None:  # one lane: both recipes build the same model (no split/merge)
        by_lanes[1] = other
    title = f"Fig. 18: more lanes -> higher loss ({recipe.capitalize()})"
    if len(by_lanes) < 2:
        return Finding(finding=title, verdict="not run", evidence=f"{len(by_lanes)} lane count(s) completed")
    lanes = sorted(by_lanes)
    first, last = by_lanes[lanes[0]], by_lanes[lanes[-1]]
    diff, margin = last.mean - first.mean, _margin(first, last, fallback)
    monotone = all(by_lanes[b].mean > by_lanes[a].mean for a, b in zip(lanes, lanes[1:]))
    values = ", ".join(f"L{n} {by_lanes[n].text()}" for n in lanes)
    if not by_lanes[lanes[0]].label.startswith(recipe):
        values += f" (L1 = {by_lanes[lanes[0]].label}: with one lane the recipes are the same model)"
    evidence = (f"{values}; L{lanes[-1]} - L{lanes[0]} = {diff:+.3f} vs spread {margin:.3f}; "
                f"{'rising at every step' if monotone else 'not monotone'}")  # fmt: skip
    return Finding(finding=title, verdict=_verdict([diff], [margin]), evidence=evidence)


def same_at_one_lane(configs: dict[str, Config], fallback: float) -> Finding:
    """Fig. 18: with one lane there is no split/merge, so Sandwich and Burger are the same model."""
    s, b = configs.get("sandwich_L1"), configs.get("burger_L1")
    title = "Fig. 18: one lane, Sandwich = Burger (no prepare/merge)"
    if s is None or b is None:
        return Finding(finding=title, verdict="not run", evidence="missing runs")
    diff, margin = b.mean - s.mean, _margin(s, b, fallback)
    verdict = "too small to decide" if math.isinf(margin) else "yes" if abs(diff) <= margin else "no"
    evidence = f"burger_L1 - sandwich_L1 = {diff:+.4f} vs spread {margin:.3f}"
    return Finding(finding=title, verdict=verdict, evidence=evidence)


def pair_finding(title: str, worse: Config | None, better: Config | None, fallback: float) -> Finding:
    """The report says ``better`` has the lower loss."""
    if worse is None or better is None:
        return Finding(finding=title, verdict="not run", evidence="missing runs")
    diff, margin = worse.mean - better.mean, _margin(worse, better, fallback)
    evidence = f"{worse.label} {worse.text()} - {better.label} {better.text()} = {diff:+.3f} vs spread {margin:.3f}"
    return Finding(finding=title, verdict=_verdict([diff], [margin]), evidence=evidence)


def sandwich_vs_burger(configs: dict[str, Config], fallback: float) -> Finding:
    """Fig. 18: Sandwich below Burger at every lane count (L1 is the same model for both)."""
    lanes = sorted(int(m.group(1)) for label in configs if (m := re.fullmatch(r"sandwich_L(\d+)", label)))
    pairs = [(n, configs.get(f"burger_L{n}"), configs[f"sandwich_L{n}"]) for n in lanes if n > 1]
    pairs = [(n, b, s) for n, b, s in pairs if b is not None]
    title = "Fig. 18: Sandwich below Burger at every lane count"
    if not pairs:
        return Finding(finding=title, verdict="not run", evidence="no lane count with both recipes")
    diffs = [b.mean - s.mean for _, b, s in pairs]
    margins = [_margin(b, s, fallback) for _, b, s in pairs]
    evidence = "; ".join(f"L{n}: burger - sandwich = {d:+.3f} (spread {m:.3f})"
                         for (n, _, _), d, m in zip(pairs, diffs, margins))  # fmt: skip
    return Finding(finding=title, verdict=_verdict(diffs, margins), evidence=evidence)


def extremum_finding(configs: dict[str, Config], a: str, b: str, warmup_fraction: float = 0.1) -> Finding:
    """Fig. 17d: Eq. 12 over the training-loss curves of the seeds of ``a`` and ``b``; positive = separated."""
    title = f"Fig. 17d: {a} and {b} separated beyond seed noise (Eq. 12 > 0)"
    ca, cb = configs.get(a), configs.get(b)
    if ca is None or cb is None or len(ca.losses) < 2 or len(cb.losses) < 2:
        return Finding(finding=title, verdict="not run", evidence="needs 2+ completed seeds of each")
    steps, dist = extremum_distance_curve([loss_curve(d) for d in ca.run_dirs], [loss_curve(d) for d in cb.run_dirs])
    if not steps:
        return Finding(finding=title, verdict="not run", evidence="no common logged steps")
    after = [x for s, x in zip(steps, dist) if s > warmup_fraction * steps[-1]]
    positive = sum(x > 0 for x in after) / max(1, len(after))
    final_eval = extremum_distance(ca.losses, cb.losses)
    lower = a if ca.mean < cb.mean else b
    tail = dist[-10:]
    if final_eval > 0 and statistics.fmean(tail) > 0:
        verdict = "yes"
    else:
        verdict = "not separated (the seed ranges overlap)" if final_eval < 0 else "too small to decide"
    evidence = (
        f"{a} {ca.text()}, {b} {cb.text()} ({ca.metric}); lower: {lower}. Eq. 12 on {ca.metric}: "
        f"{final_eval:+.3f}; on the training loss: {positive:.0%} of steps after warm-up > 0, last 10 steps "
        f"mean {statistics.fmean(tail):+.3f}"
    )
    return Finding(finding=title, verdict=verdict, evidence=evidence)


def classic_layers_findings(configs: dict[str, Config], fallback: float) -> list[Finding]:
    """§6.5 / Fig. 21: more classic layers after each TP block -> higher loss, "much more pronounced within the
    sandwiches than the burgers" (4 blocks of 4 lanes x depth 3; ``sandwich_C{n}`` / ``burger_C{n}`` runs)."""
    out, effects = [], {}
    for recipe in ("sandwich", "burger"):
        counts = sorted(int(m.group(1)) for k in configs if (m := re.fullmatch(rf"{recipe}_C(\d+)", k)))
        if len(counts) < 2:
            continue
        few, many = configs[f"{recipe}_C{counts[0]}"], configs[f"{recipe}_C{counts[-1]}"]
        title = "Fig. 21: more classic layers per TP block -> higher loss"
        title += f" ({recipe.capitalize()}, {counts[-1]} vs {counts[0]})"
        out.append(pair_finding(title, many, few, fallback))
        effects[recipe] = (many.mean - few.mean, _margin(many, few, fallback))
    if len(effects) == 2:
        (d_s, m_s), (d_b, m_b) = effects["sandwich"], effects["burger"]
        diff = d_s - d_b
        evidence = f"effect Sandwich {d_s:+.3f} - effect Burger {d_b:+.3f} = {diff:+.3f} vs spread {m_s + m_b:.3f}"
        out.append(Finding(finding="Fig. 21: the classic-layer effect is larger for Sandwich than for Burger",
                           verdict=_verdict([diff], [m_s + m_b]), evidence=evidence))  # fmt: skip
    return out


def delayed_finding(configs: dict[str, Config], fallback: float) -> list[Finding]:
    """§6.6 / Fig. 22a: summed reception trains worse ("gradient issues"); the gated one is ours."""
    base = configs.get("sandwich_L4")
    out = []
    for label, cfg in sorted(configs.items()):
        if not re.fullmatch(r"sandwich_s\d+_i\d+_n\d+(_\w+)?", label):
            continue
        reception = "sum" if label.endswith("_sum") else "mean" if label.endswith("_mean") else "gated"
        if reception == "sum":
            title = f"Fig. 22a: delayed communication with summed reception trains worse ({label} vs sandwich_L4)"
            out.append(pair_finding(title, cfg, base, fallback))
        else:  # not a report finding: where our default stands
            title = f"(ours) {reception} delayed communication vs none ({label} vs sandwich_L4)"
            f = pair_finding(title, cfg, base, fallback)
            out.append(Finding(finding=title, verdict="n/a (no report claim)", evidence=f.evidence))
    return out


def findings(rows: Sequence[dict[str, Any]], loss: str = "final_eval_loss") -> tuple[list[Finding], str]:
    """Every finding the rows can speak to, and the note on the seed spread used."""
    configs = configurations(rows, loss)
    fallback, note = seed_spread(configs)
    out = [
        extremum_finding(configs, "llama", "burger_L4"),
        extremum_finding(configs, "llama", "sandwich_L4"),
        lane_count_finding(configs, "sandwich", fallback),
        lane_count_finding(configs, "burger", fallback),
        same_at_one_lane(configs, fallback),
        sandwich_vs_burger(configs, fallback),
        pair_finding("Fig. 18: Sandwich below Burger at 4 lanes", configs.get("burger_L4"), configs.get("sandwich_L4"),
                     fallback),  # fmt: skip
        *classic_layers_findings(configs, fallback),
        *delayed_finding(configs, fallback),
    ]
    return [f for f in out if f.verdict != "not run" or f.finding.startswith(("Fig. 17d", "Fig. 18"))], note


def findings_markdown(rows: Sequence[dict[str, Any]], loss: str = "final_eval_loss") -> str:
    found, note = findings(rows, loss)
    configs = configurations(rows, loss)
    lines = [
        "| report finding | reproduced at this scale? | evidence (loss: mean ± half the seed range) |",
        "|---|---|---|",
        *(f"| {f.finding} | {f.verdict} | {f.evidence} |" for f in found),
        "",
        f"Loss: {loss} of the completed runs. Seed spread: {note}; a configuration run with one seed is judged "
        "against it.",
        "",
        "| configuration | seeds | loss mean | min | max |",
        "|---|---|---|---|---|",
        *(f"| {c.label} | {len(c.losses)} | {c.mean:.4f} | {min(c.losses):.4f} | {max(c.losses):.4f} |"
          for c in sorted(configs.values(), key=lambda c: c.label)),
        "",
        *runs_markdown(rows),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def runs_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per run (any status): size, losses, wall time -- the table's raw material."""

    def cell(value: Any, fmt: str = "") -> str:
        if value in (None, ""):
            return ""
        return format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value)

    lines = ["| run | status | params | hidden | lane width | final eval loss | final train loss | steps | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r.get('name')} | {r.get('status')} | {cell(r.get('params'), ',')} | {cell(r.get('hidden_size'))} | "
            f"{cell(r.get('lane_hidden_size'))} | {cell(r.get('final_eval_loss'), '.4f')} | "
            f"{cell(r.get('final_train_loss'), '.4f')} | {cell(r.get('step'))} | {cell(r.get('wall_s'), '.0f')} |"
        )
    return lines


def write_findings(rows: Sequence[dict[str, Any]], path: str | Path, loss: str = "final_eval_loss") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(findings_markdown(rows, loss))
    return path
