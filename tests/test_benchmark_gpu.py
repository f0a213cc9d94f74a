"""The prepared GPU check (benchmarks/gpu): its dry run end to end on CPU, so the script cannot rot, and its guards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import decode as gpu_decode
from benchmarks.gpu import run as gpu_run
from benchmarks.gpu.common import poisoned_outputs
from kernels.tolerances import tolerance_use

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_runs_every_section_on_cpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path), "--seed", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=880)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in gpu_run.SECTIONS:
        phases = result[name]["phases"]
        assert all(p["status"] == "ok" for p in phases.values()), (name, phases, result[name].get("traceback"))
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_bf16_TFLOPs"] > 0
    checks = result["kernel_correctness"]
    assert not checks["failures"], checks["failures"]
    assert {r["dtype"] for r in checks["rows"]} == {"float32", "float16", "bfloat16"}
    # rms_norm, swiglu, burger down+slice write, decode attention (+ RoPE), reception gated / mean / sum
    assert len({r["op"] for r in checks["rows"]}) == 7 and all(r["passed"] for r in checks["opcheck"])
    assert {r["impl"] for r in result["kernel_speed"]["rows"]} == {"triton", "eager", "compile"}
    assert result["comm"]["rows"][0]["correct"] is True  # async over gloo; symmetric memory is CUDA-only
    decode = result["decode"]["rows"]
    n_rows = 2 * len(gpu_decode.cases(dry_run=True))  # every case in both modes
    assert [r.get("error") for r in decode] == [None] * n_rows and {r["mode"] for r in decode} == {"graph", "compiled"}
    assert len(result["decode"]["predictions"]) == 2 * 3 * 3  # 2 modes x (burger, sandwich, dtp) x 3 t_sync values
    train = result["training"]["rows"]
    assert [r.get("error") for r in train] == [None] * 9 and all(r["tokens_per_s"] > 0 for r in train)
    # The table is the last thing printed (the tail of a device log holds it) and is saved for docs/gpu.md.
    assert "GPU check summary" in proc.stdout.strip().splitlines()[-len(result["summary"]) - 3]
    assert (tmp_path / "gpu_check.md").read_text().count("\n| ") == len(result["summary"]) + 1


def test_poisoned_outputs_and_tolerance_use():
    real_empty, real_like = torch.empty, torch.empty_like
    with poisoned_outputs():
        assert torch.empty(5).isnan().all() and torch.empty_like(torch.ones(3, dtype=torch.float16)).isnan().all()
        assert torch.empty(2, dtype=torch.long).dtype == torch.long  # integers are left alone
    assert torch.empty is real_empty and torch.empty_like is real_like  # restored
    ref = torch.ones(4)
    assert tolerance_use(ref, ref, torch.float32) == 0.0
    assert tolerance_use(ref + 5e-6, ref, torch.float32) < 1.0 < tolerance_use(ref + 1e-4, ref, torch.float32)
    unwritten = ref.clone()
    unwritten[2] = float("nan")
    assert tolerance_use(unwritten, ref, torch.float32) == float("inf")


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from benchmarks.gpu import ceilings

    def broken(*_args, **_kw):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(ceilings, "run", broken)
    assert gpu_run.main(["--dry-run", "--only", "ceilings", "--out", str(tmp_path), "--seed", "3"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ceilings"]["status"] == "failed"
    assert "planted failure" in result["ceilings"]["phases"]["ceilings"]["message"]
    assert any("failed" in row["item"] for row in result["summary"])


def test_a_spent_budget_skips_sections_with_a_message(tmp_path):
    assert gpu_run.main(["--dry-run", "--budget-s", "0.001", "--only", "ceilings,decode", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ceilings"]["status"] == result["decode"]["status"] == "skipped"
    assert set(result["decode"]["phases"]) == {"decode [graph]", "decode [compiled]"}
    assert "time budget" in result["decode"]["phases"]["decode [graph]"]["message"]


def test_bad_arguments_are_explained(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_run.main(["--dry-run", "--only", "decode,warp_drive"])
    assert exit_info.value.code == 2 and "warp_drive" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_run.main([]) == 2
        assert "--dry-run" in capsys.readouterr().err


def test_a_section_cap_interrupts_only_that_section():
    import time

    from benchmarks.gpu.common import Budget, OutOfTime

    budget = Budget(60)
    budget.arm(0.05)
    with pytest.raises(OutOfTime, match="cap"):
        time.sleep(5)
    budget.disarm()
    assert budget.left() > 50
