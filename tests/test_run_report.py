"""The end of a run: loss_curve.png (train + eval loss against tokens, lr on a second axis), a greedy sample that
the printed launch/generate.py command reproduces, and launch/report.py on run dirs vs sweep dirs."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from test_train_support import REPO, child_env, compose, launch, one_thread, tiny_data, tiny_overrides

from tpblocks.sweeps.cli import report_main
from tpblocks.train import run
from tpblocks.train.run_report import CURVE_NAME, plot_run

__all__ = ["one_thread", "tiny_data"]  # fixtures, imported for pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue (train loss), tab:orange (eval loss)


def _fake_run(run_dir, steps: int = 20, status: str = "completed"):
    """A run directory as the trainer writes it: metrics.jsonl (eval every 5 steps, one NaN) and summary.json."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "tokens": 512 * step, "lr": 1e-3 * min(1.0, step / 5), "train_loss": 6.0 - 0.1 * step}
        if step % 5 == 0 or step == 1:
            record["eval_loss"] = 6.1 - 0.09 * step
        lines.append(json.dumps(record))
    lines[3] = json.dumps({"step": 4, "tokens": 2048, "lr": 8e-4, "train_loss": "nan"})  # written by _clean
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"status": status, "step": steps, "arch": "tp_blocks", "recipe": "burger", "params": 74464,
               "final_train_loss": 6.0 - 0.1 * steps, "final_eval_loss": 6.1 - 0.09 * steps}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def _pixels_near(png, rgb, tol: int = 40) -> int:
    import matplotlib.image as mpimg

    img = (mpimg.imread(png)[..., :3] * 255).astype(int)
    return int((np.abs(img - np.array(rgb)).max(axis=-1) < tol).sum())


def test_plot_run_draws_train_and_eval_loss(tmp_path):
    run_dir = _fake_run(tmp_path / "run")
    path = plot_run(run_dir)
    assert path == run_dir / CURVE_NAME and path.read_bytes()[:8] == PNG_MAGIC
    assert _pixels_near(path, BLUE) > 200 and _pixels_near(path, ORANGE) > 200  # both curves are drawn
    assert _pixels_near(plot_run(run_dir, tmp_path / "x.png"), ORANGE) == _pixels_near(path, ORANGE)


def test_plot_run_refuses_a_directory_without_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no finite train_loss"):
        plot_run(tmp_path)


def test_report_plots_a_run_dir_and_keeps_the_table_for_a_directory_of_runs(tmp_path, capsys):
    a, b = _fake_run(tmp_path / "runs" / "a"), _fake_run(tmp_path / "runs" / "b", status="diverged")
    assert report_main([str(a)]) == 0
    assert (a / CURVE_NAME).read_bytes()[:8] == PNG_MAGIC and not (a / "report").exists()
    assert report_main([str(a), str(b), "--out", str(tmp_path / "curves")]) == 0
    assert sorted(p.name for p in (tmp_path / "curves").iterdir()) == [f"a_{CURVE_NAME}", f"b_{CURVE_NAME}"]
    capsys.readouterr()
    assert report_main([str(tmp_path / "runs"), "--no-plots"]) == 0  # a directory of runs: the sweep table
    assert "2 rows ->" in capsys.readouterr().out and (tmp_path / "runs" / "report" / "results.csv").is_file()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert report_main([str(tmp_path / "empty")]) == 2


def test_sample_tokens_zero_skips_the_sample_but_not_the_curve(tiny_data, tmp_path, capsys, one_thread):
    run_dir = tmp_path / "run"
    run(compose(tiny_overrides(tiny_data, run_dir, **{"train.max_steps": 2, "train.sample_tokens": 0})))
    err = capsys.readouterr().err
    assert (run_dir / CURVE_NAME).is_file() and f"loss curve: {run_dir / CURVE_NAME}" in err
    assert "greedy sample" not in err and "launch/generate.py" not in err


@pytest.mark.slow
def test_main_job_ends_with_a_curve_and_a_sample_the_printed_command_reproduces(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(tiny_overrides(tiny_data, run_dir, **{"train.sample_prompt": "'The object'"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / CURVE_NAME).read_bytes()[:8] == PNG_MAGIC
    lines = proc.stderr.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("greedy sample (")), None)
    assert at is not None, proc.stderr[-3000:]
    sample = ast.literal_eval(lines[at].partition("): ")[2])
    command = lines[at + 1].removeprefix("more: ")
    assert sample.startswith("The object") and len(sample) > len("The object")
    argv = shlex.split(command)
    assert argv[1] == "launch/generate.py" and argv[2] == f"checkpoint={run_dir}"
    # The job's interpreter: by name when PATH finds it first, else its path (shown relative to the checkout).
    assert argv[0] == "python" or os.path.abspath(REPO / argv[0]) == os.path.abspath(sys.executable), argv[0]
    gen = subprocess.run(argv, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)  # as printed
    assert gen.returncode == 0, gen.stderr[-3000:]
    text = gen.stdout.partition("\ntext: ")[2].rpartition("\ngenerated: ")[0]
    assert text == sample  # the same checkpoint, tokenizer and greedy decode
