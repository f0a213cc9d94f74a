"""``trainer=fsdp`` (FSDP2 ``fully_shard`` on the dp mesh) through the real entry point (torchrun, gloo).

* 2 ranks: the same losses, gradient norms and final weights as ``trainer=ddp`` on 2 ranks (only the reduction
  order differs: FSDP2 reduce-scatters what DDP all-reduces).
* Its sharded checkpoint resumes: under fsdp on 2 ranks (the same curve onward), under ddp in one process
  (fsdp -> ddp, dp 2 -> 1), and under fsdp with parallel.lane=2 (dp 2 -> lane 2).
* dp 2 x lane 2 on 4 ranks under fsdp equals one process: tests/test_train_parallel.py (both backends).
"""

from __future__ import annotations

import pytest
from test_train_parallel import _assert_same_curve, _assert_same_weights, _col, _resumed, _why
from test_train_support import compose, launch, one_thread, read_metrics, read_summary, tiny_data, tiny_overrides

from tpblocks.train import checkpoint as ckpt_io
from tpblocks.train import run

__all__ = ["one_thread", "tiny_data"]

# 6 steps of 512 tokens (micro_batch 8 x 32 tokens x 2 ranks), checkpoints at steps 3 and 6. 1536 held-out tokens
# are 3 batches of 16 x 32: 2 on rank 0, 1 on rank 1, whose FSDP forwards must keep pace (Trainer.eval_rounds).
EXTRA = {
    "train.max_steps": 6,
    "train.eval_every": 3,
    "train.checkpoint_every": 3,
    "train.sample_tokens": 0,
    "train.eval_tokens": 1536,
}
FSDP = {"trainer": "fsdp"}


@pytest.fixture(scope="module")
def fsdp_two_ranks(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp2") / "run"
    proc = launch(tiny_overrides(tiny_data, run_dir, **EXTRA, **FSDP), nproc=2)
    assert proc.returncode == 0, _why(proc)
    assert "FSDP2: fully_shard over dp 2 (lane 1), fp32" in proc.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_fsdp_two_ranks_equals_ddp(fsdp_two_ranks, tiny_data, tmp_path):
    ddp_dir = tmp_path / "ddp"
    proc = launch(tiny_overrides(tiny_data, ddp_dir, **EXTRA), nproc=2)
    assert proc.returncode == 0, _why(proc)
    summary = read_summary(fsdp_two_ranks)
    assert summary["status"] == "completed" and summary["backend"] == "fsdp" and summary["world_size"] == 2
    fsdp, ddp = read_metrics(fsdp_two_ranks), read_metrics(ddp_dir)
    _assert_same_curve(fsdp, ddp, tol=1e-5)
    assert _col(ddp, "train_loss")[-1] < _col(ddp, "train_loss")[0] - 0.2  # it learns: equal curves, equal updates
    # dcp/ of an fsdp run holds full-model keys and shapes: it converts and equals DDP's weights.
    _assert_same_weights(ckpt_io.latest_checkpoint(fsdp_two_ranks), ckpt_io.latest_checkpoint(ddp_dir))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_fsdp_checkpoint_resumes_under_fsdp_and_under_ddp(fsdp_two_ranks, tiny_data, tmp_path, one_thread):
    full = read_metrics(fsdp_two_ranks)
    step3 = ckpt_io.checkpoint_root(fsdp_two_ranks) / ckpt_io.step_dir_name(3)
    assert ckpt_io.load_trainer_state(step3)["backend"] == "fsdp"
    again = _resumed(tiny_data, tmp_path / "fsdp", EXTRA, step3, nproc=2, **FSDP)
    _assert_same_curve(again, full[3:], tol=1e-6)
    # fsdp on 2 ranks -> ddp in one process (accumulation 2): the same curve to fp32 tolerance
    single = _resumed(tiny_data, tmp_path / "ddp1", EXTRA, step3, nproc=1)
    _assert_same_curve(single, full[3:], tol=2e-5)
    # fsdp dp 2 -> fsdp lane 2 (dp 1): the dp shards become lane shards
    lane = _resumed(tiny_data, tmp_path / "lane2", EXTRA, step3, nproc=2, **FSDP, **{"parallel.lane": 2})
    _assert_same_curve(lane, full[3:], tol=2e-5)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_fsdp_bf16_gathers_track_fp32(fsdp_two_ranks, tiny_data, tmp_path):
    bf16_dir = tmp_path / "bf16"
    proc = launch(tiny_overrides(tiny_data, bf16_dir, **EXTRA, **FSDP, **{"train.precision": "bf16"}), nproc=2)
    assert proc.returncode == 0, _why(proc)
    assert "FSDP2: fully_shard over dp 2 (lane 1), bf16 gathers, fp32 reductions" in proc.stderr
    fp32, bf16 = _col(read_metrics(fsdp_two_ranks), "train_loss"), _col(read_metrics(bf16_dir), "train_loss")
    assert fp32 != bf16  # bf16 really ran (different rounding)
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05


def test_fsdp_in_one_process_trains_as_ddp(tiny_data, tmp_path, one_thread):
    """Nothing to shard over one rank: trainer=fsdp runs the model as it is, the same floats as trainer=ddp."""
    short = {"train.max_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0, "train.sample_tokens": 0}
    run(compose(tiny_overrides(tiny_data, tmp_path / "fsdp", **short, **FSDP)))
    run(compose(tiny_overrides(tiny_data, tmp_path / "ddp", **short)))
    keys = ("train_loss", "grad_norm")
    got, want = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "ddp")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
