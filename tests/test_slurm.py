"""Sweeps on a real Slurm: a single-node cluster on localhost (launch/slurm/local_cluster.sh), tiny trainings.

The fixture installs slurm-wlm + munge with apt-get when they are missing (about 25 s), starts only the daemons
that are not already running, and stops exactly those at the end. It skips, with the reason, when not root or
when the packages cannot be installed / the cluster cannot start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tpblocks.sweeps.collect import read_csv
from tpblocks.sweeps.manifest import read_manifest
from tpblocks.sweeps.submit import wait_for_array

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
TINY = ["--scale", "tiny", "--knob", "tokens=2048", "--cpus-per-task", "1", "--override", "train.progress=false"]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (apt-get, munged, slurmctld, slurmd)")
    if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        if not shutil.which("apt-get"):
            pytest.skip("slurm-wlm/munge are not installed and there is no apt-get to install them")
        proc = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"cannot install slurm-wlm/munge: {(proc.stderr or proc.stdout).strip()[-400:]}")
    # A state file of our own: `stop` then stops only what this `start` started.
    env = {**os.environ, "TPB_SLURM_STATE": str(tmp_path_factory.mktemp("slurm") / "started")}
    proc = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120, env=env)
        pytest.skip(f"the local Slurm cluster did not start: {(proc.stderr or proc.stdout).strip()[-400:]}")
    yield
    subprocess.run([str(CLUSTER), "stop"], check=True, capture_output=True, text=True, timeout=120, env=env)


def _submit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "launch/slurm/submit.py", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _job_id(stdout: str) -> str:
    match = re.search(r"submitted array job (\d+)", stdout)
    assert match, stdout
    return match.group(1)


@pytest.mark.timeout(900)
def test_sbatch_array_lane_count_sweep_end_to_end(local_slurm, tmp_path):
    """3 lane counts as one job array + a separately submitted task that fails; the report keeps all four."""
    good, bad = tmp_path / "lanes", tmp_path / "broken"
    job_good = _job_id(_submit("lane_count", *TINY, "--set", "lane_count=1,2,4", "--set", "recipe=sandwich",
                               "--sweep-dir", str(good)).stdout)  # fmt: skip
    # train.micro_batch=0 is rejected by the trainer's config check: a real failure of a real array task.
    job_bad = _job_id(_submit("lane_count", *TINY, "--set", "lane_count=2", "--set", "recipe=sandwich",
                              "--override", "train.micro_batch=0", "--sweep-dir", str(bad)).stdout)  # fmt: skip
    assert job_good != job_bad
    wait_for_array(job_good, timeout_s=600)
    wait_for_array(job_bad, timeout_s=120)

    out = subprocess.run([sys.executable, "launch/report.py", str(good), str(bad), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = read_csv(tmp_path / "rep" / "results.csv")
    by_dir = {Path(r["run_dir"]).parent.parent: r for r in rows if r["sweep"] and r["run_dir"]}
    assert len(rows) == 4 and set(by_dir) == {good, bad}
    completed = [r for r in rows if Path(r["run_dir"]).parent.parent == good]
    assert sorted(int(r["lane_count"]) for r in completed) == [1, 2, 4]
    for row in completed:
        assert row["status"] == "completed", row
        assert int(row["step"]) == 2 and 0.0 < float(row["final_train_loss"]) < 20.0
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        model = json.loads((Path(row["run_dir"]) / "model_config.json").read_text())
        # the array element trained the point its SLURM_ARRAY_TASK_ID names
        assert model["lane_count"] == int(row["lane_count"]) and summary["params"] == int(row["params"])
    [failed] = [r for r in rows if Path(r["run_dir"]).parent.parent == bad]
    assert failed["status"] == "failed" and "micro_batch" in failed["error"], failed
    # each element launched torchrun with a rendezvous taken from the Slurm allocation
    manifest = read_manifest(good)
    for i, task in enumerate(manifest.tasks):
        log = (good / "slurm" / f"{job_good}_{i}.out").read_text()
        assert "rendezvous" in log and f"run_dir={task.run_dir}" in log
    png = tmp_path / "rep" / "fig18_lane_count.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert "failed 1" in out.stdout and "completed 3" in out.stdout


@pytest.mark.timeout(900)
def test_hydra_submitit_slurm_launcher(local_slurm, tmp_path):
    """The same sweep through `launch/train.py -m hydra/launcher=slurm` (hydra-submitit-launcher)."""
    sweep = tmp_path / "hydra"
    proc = _submit("lane_count", *TINY, "--set", "lane_count=1,4", "--set", "recipe=burger", "--backend", "hydra",
                   "--sweep-dir", str(sweep), "--report", timeout=800)  # fmt: skip
    rows = {r["name"]: r for r in read_csv(sweep / "report" / "results.csv")}
    assert set(rows) == {"burger_L1", "burger_L4"}
    for name, row in rows.items():
        assert row["status"] == "completed", (name, row, proc.stdout[-2000:])
        assert int(json.loads((Path(row["run_dir"]) / "model_config.json").read_text())["lane_count"]) == int(
            row["lane_count"])  # fmt: skip
    # submitit really went through Slurm: its job folders are named by Slurm array job ids
    assert any(p.name.split("_")[0].isdigit() for p in (sweep / "hydra" / ".submitit").iterdir())
    assert (sweep / "report" / "fig18_lane_count.png").stat().st_size > 10_000


@pytest.mark.timeout(600)
def test_submitit_auto_executor(local_slurm, tmp_path):
    """`--backend submitit`: submitit.AutoExecutor picks Slurm (sbatch is on the PATH) and runs the task runner."""
    sweep = tmp_path / "submitit"
    proc = _submit("lane_count", *TINY, "--set", "lane_count=2", "--set", "recipe=burger", "--backend", "submitit",
                   "--sweep-dir", str(sweep), "--wait", "--report", timeout=500)  # fmt: skip
    assert "submitted 1 submitit jobs" in proc.stdout
    [row] = read_csv(sweep / "report" / "results.csv")
    assert row["name"] == "burger_L2" and row["status"] == "completed", row
    log = (sweep / "logs" / "000_burger_L2.log").read_text()
    assert "OMP_NUM_THREADS" not in log and "completed" in log  # the task log is the trainer's own output
    assert any((sweep / "submitit").glob("*_submission.sh")), "submitit did not write a Slurm submission script"
