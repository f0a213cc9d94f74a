"""A run killed with SIGKILL and resumed with ``train.resume=auto`` reproduces the uninterrupted run exactly.

Both runs go through the real entry point in subprocesses (same seed, CPU, fp32, one thread each). The killed
run is stopped with ``kill -9`` right after its first checkpoint is published (it has usually logged a few more
steps by then: resuming must drop them and recompute them identically).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from test_train_support import REPO, child_env, launch, launch_cmd, read_metrics, tiny_data, tiny_overrides

from tpblocks.train import checkpoint as ckpt_io

__all__ = ["tiny_data"]

STEPS, EVERY = 12, 4
KEYS = ("step", "lr", "train_loss", "tokens", "eval_loss", "grad_norm")


def _curve(run_dir) -> list[tuple]:
    return [tuple(r.get(k) for k in KEYS) for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_then_resume_reproduces_the_loss_curve_exactly(tiny_data, tmp_path):
    extra = {"train.max_steps": STEPS, "train.checkpoint_every": EVERY, "train.eval_every": EVERY}
    reference = tmp_path / "reference"
    done = launch(tiny_overrides(tiny_data, reference, **extra))
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        launch_cmd(tiny_overrides(tiny_data, killed, **extra)), cwd=REPO, env=child_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while ckpt_io.latest_checkpoint(killed) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    first = ckpt_io.latest_checkpoint(killed)
    assert first is not None and int(first.name.split("_")[1]) < STEPS
    steps_before = len(read_metrics(killed))

    resumed = launch(tiny_overrides(tiny_data, killed, **extra, **{"train.resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {first}" in resumed.stderr

    ref, got = _curve(reference), _curve(killed)
    assert [r[0] for r in got] == list(range(1, STEPS + 1)), f"steps logged before the kill: {steps_before}"
    assert got == ref  # exact equality: same floats, same lr, same eval points
