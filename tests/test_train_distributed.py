"""Multi-rank training through torchrun (gloo on CPU): 1 rank == 2 ranks at equal effective batch, DeepSpeed
ZeRO-2 == DDP (and resumes its own checkpoint), DeepSpeed in one process == the plain step, and the 2-rank smoke
experiment learns."""

from __future__ import annotations

import pytest
import torch
from test_train_support import (
    compose,
    eval_curve,
    launch,
    one_thread,
    read_metrics,
    read_summary,
    tiny_data,
    tiny_overrides,
)

from tpblocks.models.io import load_model
from tpblocks.train import checkpoint as ckpt_io
from tpblocks.train import run

__all__ = ["one_thread", "tiny_data"]

EXTRA = {"train.max_steps": 6, "train.eval_every": 3, "train.checkpoint_every": 0}


def _losses(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


@pytest.fixture(scope="module")
def ddp_two_ranks(tiny_data, tmp_path_factory):
    """6 steps of 512 tokens on 2 ranks (micro_batch 8 x 32 tokens x 2 ranks, no accumulation)."""
    run_dir = tmp_path_factory.mktemp("ddp2") / "run"
    proc = launch(tiny_overrides(tiny_data, run_dir, **EXTRA), nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_one_rank_equals_two_ranks(tiny_data, ddp_two_ranks, tmp_path, one_thread):
    """Same tokens per step, split as 1 rank x 2 accumulation vs 2 ranks x 1: same losses up to float order."""
    summary = run(compose(tiny_overrides(tiny_data, tmp_path / "one", **EXTRA)))
    one, two = read_metrics(tmp_path / "one"), read_metrics(ddp_two_ranks)
    assert read_summary(ddp_two_ranks)["world_size"] == 2 and summary["world_size"] == 1
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    assert _losses(one, "lr") == _losses(two, "lr")
    assert _losses(one, "tokens") == _losses(two, "tokens")
    torch.testing.assert_close(_losses(two, "train_loss"), _losses(one, "train_loss"), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(_losses(two, "eval_loss"), _losses(one, "eval_loss"), rtol=2e-5, atol=2e-5)
    # Not trivially equal: the model learns over these steps, so equal curves mean equal updates.
    assert _losses(one, "train_loss")[-1] < _losses(one, "train_loss")[0] - 0.2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_deepspeed_zero2_two_ranks_matches_ddp(tiny_data, ddp_two_ranks, tmp_path):
    run_dir = tmp_path / "ds"
    ds_cfg = {**EXTRA, "train.checkpoint_every": 3, "trainer": "deepspeed", "trainer.zero_stage": 2}
    proc = launch(tiny_overrides(tiny_data, run_dir, **ds_cfg), 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["backend"] == "deepspeed" and summary["world_size"] == 2
    ds, ddp = read_metrics(run_dir), read_metrics(ddp_two_ranks)
    # fp32 ZeRO-2 does the same AdamW update from partitioned states: equal to DDP up to reduction order.
    torch.testing.assert_close(_losses(ds, "train_loss"), _losses(ddp, "train_loss"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_losses(ds, "eval_loss"), _losses(ddp, "eval_loss"), rtol=1e-4, atol=1e-4)
    latest = ckpt_io.latest_checkpoint(run_dir)
    assert (latest / "deepspeed").is_dir() and (latest / "dcp" / ".metadata").is_file()
    assert load_model(ckpt_io.model_file(latest)).cfg.hidden_size == 32  # converts to the plain contract format

    # Resume from step 3: weights from dcp/, ZeRO-2 optimizer partitions from the engine's own files.
    step3 = ckpt_io.checkpoint_root(run_dir) / ckpt_io.step_dir_name(3)
    resumed = tmp_path / "resumed"
    proc = launch(tiny_overrides(tiny_data, resumed, **ds_cfg, **{"train.resume": str(step3)}), 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = read_metrics(resumed)
    assert [r["step"] for r in after] == [4, 5, 6]
    torch.testing.assert_close(_losses(after, "train_loss"), _losses(ds[3:], "train_loss"), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"written by trainer=deepspeed.*resume it with trainer=deepspeed"):
        run(compose(tiny_overrides(tiny_data, tmp_path / "ddp", **EXTRA, **{"train.resume": str(step3)})))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_in_one_process_equals_the_plain_step(tiny_data, tmp_path):
    """No launcher: the trainer starts DeepSpeed's one-rank group itself (``init_distributed(group_of_one=True)``)."""
    runs = {name: tmp_path / name for name in ("deepspeed", "plain")}
    ds = launch(
        tiny_overrides(tiny_data, runs["deepspeed"], **EXTRA, **{"trainer": "deepspeed", "trainer.zero_stage": 1})
    )
    assert ds.returncode == 0, ds.stderr[-4000:]
    assert read_summary(runs["deepspeed"])["backend"] == "deepspeed"
    plain = launch(tiny_overrides(tiny_data, runs["plain"], **EXTRA))
    assert plain.returncode == 0, plain.stderr[-4000:]
    ds_m, plain_m = read_metrics(runs["deepspeed"]), read_metrics(runs["plain"])
    torch.testing.assert_close(_losses(ds_m, "train_loss"), _losses(plain_m, "train_loss"), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_smoke_experiment_on_two_ranks_learns(tmp_path):
    """`torchrun --nproc_per_node=2 launch/train.py +experiment=smoke`, shortened to 40 steps (embedded data)."""
    run_dir = tmp_path / "smoke"
    overrides = ["+experiment=smoke", f"run_dir={run_dir}", "train.max_steps=40", "train.eval_every=20"]
    proc = launch([*overrides, "train.progress=false"], nproc=2, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["experiment"] == "smoke" and summary["world_size"] == 2
    evals = eval_curve(read_metrics(run_dir))
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0, evals  # falls clearly (from ~ln 4096 = 8.3)
    assert f"run dir: {run_dir}" in proc.stderr
