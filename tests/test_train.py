"""End-to-end single-process training runs (in this process, tiny Burger, a few seconds each)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from test_train_support import (
    compose,
    eval_curve,
    one_thread,
    read_metrics,
    read_summary,
    tiny_data,
    tiny_overrides,
)

from tpblocks.models.io import load_model
from tpblocks.train import checkpoint as ckpt_io
from tpblocks.train import distributed, run

__all__ = ["one_thread", "tiny_data"]  # fixtures, imported for pytest


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _run(tiny_data, run_dir, **extra) -> dict:
    return run(compose(tiny_overrides(tiny_data, run_dir, **extra)))


def test_tiny_run_fills_the_run_directory(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    summary = _run(
        tiny_data, run_dir, **{"train.max_steps": 12, "train.eval_every": 6, "scheduler.warmup_fraction": 0.25}
    )
    assert summary == read_summary(run_dir)
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["step"] == 12 and summary["tokens_seen"] == 12 * 512
    assert summary["arch"] == "tp_blocks" and summary["recipe"] == "burger" and summary["lane_count"] == 4
    assert summary["flavor"] == "debug_burger" and summary["experiment"] == "quickstart"

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert {"step", "lr", "train_loss", "tokens", "tokens_per_s", "elapsed_s"} <= set(r)
        assert math.isfinite(r["train_loss"]) and r["tokens"] == r["step"] * 512
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 6, 12]
    evals = eval_curve(records)
    assert evals[-1] < evals[0] - 0.3, evals  # it learns (ln 384 = 5.95 at the start)
    assert summary["final_eval_loss"] == evals[-1]
    lrs = [r["lr"] for r in records]
    cosine_2nd = 3e-3 * 0.5 * (1 + math.cos(math.pi / 9))  # 3 warm-up steps, then a cosine over 9
    assert lrs[:5] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, cosine_2nd])
    assert lrs[-1] < lrs[3]

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 12 and config["run_dir"] == str(run_dir)  # resolved, not ${...}
    model_cfg = yaml.safe_load((run_dir / "model_config.json").read_text())
    assert model_cfg["hidden_size"] == 32 and model_cfg["vocab_size"] == 384

    latest = ckpt_io.latest_checkpoint(run_dir)
    assert latest.name == "step_00000012"
    assert [p.name for p in ckpt_io.complete_checkpoints(run_dir)] == ["step_00000008", "step_00000012"]
    # The end-of-run sample converted the final checkpoint's dcp/ into a plain tpblocks model file, signed.
    assert (latest / "model.pt").is_file() and ckpt_io.checkpoint_damage(latest) is None
    model = load_model(latest)
    assert model.cfg.hidden_size == 32
    state = torch.load(latest / "trainer.pt", weights_only=True)
    assert state["step"] == 12 and state["world_size"] == 1
    assert {"optimizer_groups", "scheduler", "rng", "loader", "model_config"} <= set(state)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real = distributed.compute_loss
    calls = {"n": 0}

    def poisoned(logits, targets):  # 2 micro-batches per step: calls 11-12 are step 6
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] > 10 else loss

    monkeypatch.setattr(distributed, "compute_loss", poisoned)
    run_dir = tmp_path / "run"
    summary = _run(tiny_data, run_dir, **{"train.max_steps": 10, "train.checkpoint_every": 4})
    assert summary["status"] == "diverged" and summary["step"] == 5
    assert "step 6" in summary["error"] and "step_00000004" in summary["error"]
    assert read_summary(run_dir)["status"] == "diverged"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert ckpt_io.latest_checkpoint(run_dir).name == "step_00000004"
    model = load_model(ckpt_io.model_file(ckpt_io.latest_checkpoint(run_dir)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_wsd_run_extends_from_a_stable_phase_checkpoint(tiny_data, tmp_path):
    first = tmp_path / "first"
    wsd = {"scheduler": "wsd", "scheduler.decay_fraction": 0.5, "scheduler.warmup_fraction": 0.25}
    _run(tiny_data, first, **wsd, **{"train.max_steps": 8, "train.checkpoint_every": 4})
    lrs_first = [r["lr"] for r in read_metrics(first)]
    assert lrs_first[2:4] == pytest.approx([3e-3, 3e-3]) and lrs_first[-1] < 1e-3  # stable, then decayed

    # Step 4 is the last stable update of the 8-step run: extend it to 16 steps (decay moves to 8..16).
    longer = tmp_path / "longer"
    ckpt4 = first / "checkpoints" / "step_00000004"
    summary = _run(tiny_data, longer, **wsd, **{"train.max_steps": 16, "train.resume": ckpt4})
    assert summary["status"] == "completed" and summary["step"] == 16
    records = read_metrics(longer)
    assert [r["step"] for r in records] == list(range(5, 17))
    lrs = [r["lr"] for r in records]
    assert lrs[:4] == pytest.approx([3e-3] * 4)  # steps 5-8: still the peak (warm-up kept at 2 steps)
    assert lrs[4:] == pytest.approx([3e-3 * (1 - i / 8) for i in range(8)])  # steps 9-16: the new decay
    assert records[0]["train_loss"] == pytest.approx(read_metrics(first)[4]["train_loss"], rel=1e-6)

    # The run's final checkpoint (step 8) is inside the decay: it cannot be extended.
    with pytest.raises(ValueError, match="past the stable phase"):
        _run(tiny_data, tmp_path / "bad", **wsd, **{"train.max_steps": 16, "train.resume": first})


def test_bf16_autocast_on_cpu_tracks_fp32(tiny_data, tmp_path):
    fp32 = _run(tiny_data, tmp_path / "fp32", **{"train.max_steps": 4, "train.precision": "fp32"})
    bf16 = _run(tiny_data, tmp_path / "bf16", **{"train.max_steps": 4, "train.precision": "bf16"})
    assert bf16["status"] == "completed"
    a, b = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in b]  # bf16 really ran (different rounding)
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) < 0.05
    assert abs(fp32["final_eval_loss"] - bf16["final_eval_loss"]) < 0.05


@pytest.mark.slow
def test_compiled_training_tracks_eager(tiny_data, tmp_path):
    """train.compile=true really trains through torch.compile (inductor; ~1 min of cold compile on CPU)."""
    import torch._dynamo
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _run(tiny_data, tmp_path / "eager", **{"train.max_steps": 3, "train.eval_every": 3})
    compiled = _run(tiny_data, tmp_path / "compiled", **{"train.max_steps": 3, "train.eval_every": 3,
                                                          "train.compile": True})  # fmt: skip
    assert compiled["status"] == "completed"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # something was compiled
    a, b = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=1e-4)
    assert compiled["final_eval_loss"] == pytest.approx(eager["final_eval_loss"], rel=1e-4)


def test_wandb_offline_writes_into_the_run_dir(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    summary = _run(tiny_data, run_dir, **{"train.max_steps": 2, "wandb.mode": "offline"})
    assert summary["status"] == "completed"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
