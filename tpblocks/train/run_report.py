"""What a finished run shows its user: the loss curve as a PNG, a greedy sample, and the command to go on.

``plot_run(run_dir)`` draws ``<run_dir>/loss_curve.png`` from ``metrics.jsonl`` (train and eval loss against
tokens, the learning rate on a second axis); the trainer calls it at the end of every run and
``launch/report.py <run_dir>`` calls it on any run directory. ``greedy_sample`` is the one place that decodes
for the end-of-run report (it calls ``tpblocks.infer.generate``), and ``generate_command`` is the
``launch/generate.py`` line that reproduces that sample and is the starting point for more.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path

from .metrics import read_metrics

CURVE_NAME = "loss_curve.png"
REPO = Path(__file__).resolve().parents[2]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(tokens, values) of the records carrying a finite ``key`` (NaN/inf are stored as strings: skipped)."""
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(float(r.get("tokens", r.get("step", 0))))
            ys.append(float(value))
    return xs, ys


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the run's loss curve (default ``<run_dir>/loss_curve.png``) and return its path.

    ValueError when the directory has no metrics.jsonl or no finite train loss in it."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = _series(records, "train_loss")
    if not train[0]:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no finite train_loss to plot (is it a run directory?)")
    evals, lrs = _series(records, "eval_loss"), _series(records, "lr")

    import matplotlib

    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*train, color="tab:blue", lw=1.2, label="train loss")
    if evals[0]:
        ax.plot(*evals, color="tab:orange", lw=1.8, marker="o", ms=4, label="eval loss (held out)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()  # the schedule explains the curve's bends: warm-up, decay
    lr_ax.plot(*lrs, color="tab:gray", lw=1.0, ls="--", label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    lr_ax.tick_params(axis="y", colors="tab:gray")
    lr_ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")
    ax.set_title(_title(run_dir, records, evals[1]), fontsize=10)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / CURVE_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _title(run_dir: Path, records: list[dict], evals: list[float]) -> str:
    """Run name, what was trained (from summary.json when the run wrote one), steps, first and last eval loss."""
    from matplotlib.ticker import EngFormatter

    parts = [run_dir.resolve().name]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("arch"):
        model = " ".join(str(summary[k]) for k in ("arch", "recipe") if summary.get(k))
        params = summary.get("params")
        parts.append(f"{model}, {EngFormatter(places=1)(params)} params" if isinstance(params, int) else model)
    parts.append(f"{records[-1].get('step', len(records))} steps")
    if evals:
        parts.append(f"eval loss {evals[0]:.2f} -> {evals[-1]:.2f}")
    if summary.get("status") not in (None, "completed"):
        parts.append(str(summary["status"]))
    return " | ".join(parts)


def greedy_sample(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike, prompt: str, max_new_tokens: int):
    """(prompt + continuation as text, tokens asked for) of a greedy decode after ``prompt``: BOS + prompt, stop
    at EOS, capped at the model's context. The recipe of launch/generate.py, so ``generate_command`` reproduces it."""
    import sentencepiece as spm

    from tpblocks.infer import generate
    from tpblocks.models.io import load_model

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    prompt_ids = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(prompt)
    model = load_model(model_path).eval()
    n = max(0, min(max_new_tokens, model.cfg.max_seq_len - len(prompt_ids)))
    out = generate(model, prompt_ids, n, temperature=0.0, eos_id=sp.eos_id() if sp.eos_id() >= 0 else None)
    return sp.decode(prompt_ids + out), n  # decoded together: a continuation alone loses its leading space


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to copy), else absolute.
    Symlinks are kept: a venv's python is a link to the base interpreter, which lacks the venv's packages."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path(os.path.abspath(Path.cwd()))))
    except ValueError:
        return str(path)


def _python() -> str:
    """``python`` when that is this interpreter on PATH (e.g. an activated venv), else this interpreter's path:
    launch/quickstart.py runs the job with .venv's python without activating it."""
    found = shutil.which("python")
    if found and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python"
    return _shown(Path(sys.executable))


def generate_command(run_dir: str | os.PathLike, prompt: str, max_new_tokens: int) -> str:
    """The shell line that decodes from the run's latest checkpoint exactly as ``greedy_sample`` did."""
    script = _shown(REPO / "launch" / "generate.py")
    args = [f"checkpoint={_shown(Path(run_dir))}", f"prompt={prompt}", f"max_new_tokens={max_new_tokens}"]
    return shlex.join([_python(), script, *args])
