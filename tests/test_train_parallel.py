"""Lane-parallel and layer-parallel (MGRIT) training through the real entry point (torchrun, 2 ranks, gloo).

* ``parallel.lane=2``: the model is sharded over both ranks (TP-block lanes for Burger, Megatron shards for
  Llama); at the same effective batch the losses equal the one-process run's, the sharded checkpoint converts to
  the FULL model (loads in one process and equals the one-process run's weights), and a resume from it continues
  the same curve: with the same layout, with parallel.lane=1 in one process, and the other way round (lane 1 ->
  2, dp 1 -> 2 with async checkpoints, dp 2 -> 1). On 4 ranks, a dp 2 x lane 2 mesh gives the same curve too,
  under trainer=ddp and trainer=fsdp.
* ``layer_parallel.enabled=true``: Llama's layer stack is solved by MGRIT over both ranks; the losses stay within
  a stated tolerance of the serial run and the ``lp/*`` monitor figures land in metrics.jsonl.
"""

from __future__ import annotations

import pytest
import torch
from test_train_support import compose, launch, one_thread, read_metrics, read_summary, tiny_data, tiny_overrides

from tpblocks.models.io import load_model
from tpblocks.train import checkpoint as ckpt_io
from tpblocks.train import run

__all__ = ["one_thread", "tiny_data"]

# 6 steps of 512 tokens; lane=2 has one data replica, so micro_batch 8 x 32 tokens x accumulation 2 on both
# layouts. Checkpoints at steps 3 and 6.
EXTRA = {"train.max_steps": 6, "train.eval_every": 3, "train.checkpoint_every": 3}
# The zoo's debug_llama at the trainer tests' tiny size: 4 decoder layers, 2 heads (so 2 Megatron shards).
LLAMA = {"model": "debug_llama", "+model.overrides.n_layers": 4}


def _why(proc) -> str:
    """The ranks' own error lines first (torchrun's summary of a failure buries them), then the tail."""
    lines = proc.stderr.splitlines()
    own = [line for line in lines if "Error" in line or "error:" in line]
    return "\n".join(own[:40]) + "\n---\n" + proc.stderr[-3000:]


def _col(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


def _assert_same_curve(got: list[dict], want: list[dict], tol: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    torch.testing.assert_close(_col(got, "train_loss"), _col(want, "train_loss"), rtol=tol, atol=tol)
    torch.testing.assert_close(_col(got, "eval_loss"), _col(want, "eval_loss"), rtol=tol, atol=tol)
    torch.testing.assert_close(_col(got, "grad_norm"), _col(want, "grad_norm"), rtol=1e-4, atol=1e-5)


def _assert_same_weights(a_dir, b_dir) -> None:
    a, b = load_model(ckpt_io.model_file(a_dir)), load_model(ckpt_io.model_file(b_dir))
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", ["debug_burger", "debug_llama"])
def test_lane_parallel_two_ranks_equals_one_process(model, tiny_data, tmp_path, one_thread):
    extra = {**EXTRA, **(LLAMA if model == "debug_llama" else {})}
    lane_dir, one_dir = tmp_path / "lane2", tmp_path / "one"
    proc = launch(tiny_overrides(tiny_data, lane_dir, **extra, **{"parallel.lane": 2}), nproc=2)
    assert proc.returncode == 0, _why(proc)
    assert "lane parallel: dp 1 x lane 2" in proc.stderr and "DTensor lane shards" in proc.stderr
    run(compose(tiny_overrides(tiny_data, one_dir, **extra)))
    summary = read_summary(lane_dir)
    assert summary["status"] == "completed" and summary["parallel"] == {"dp": 1, "lane": 2}
    lane, one = read_metrics(lane_dir), read_metrics(one_dir)
    assert [r["step"] for r in lane] == list(range(1, 7))
    _assert_same_curve(lane, one, tol=2e-5)
    assert _col(one, "train_loss")[-1] < _col(one, "train_loss")[0] - 0.2  # it learns: equal curves mean equal updates

    # Each rank wrote its shard; converted, they are the full model and equal the one-process weights.
    latest = ckpt_io.latest_checkpoint(lane_dir)
    assert {p.name for p in (latest / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    _assert_same_weights(latest, ckpt_io.latest_checkpoint(one_dir))
    assert ckpt_io.load_trainer_state(latest)["lane"] == 2

    if model != "debug_burger":
        return
    # Resume from step 3 in a new run dir, same layout: the same curve onward, to the last bit that matters.
    step3 = ckpt_io.checkpoint_root(lane_dir) / ckpt_io.step_dir_name(3)
    after = _resumed(tiny_data, tmp_path / "resumed", extra, step3, nproc=2, **{"parallel.lane": 2})
    _assert_same_curve(after, [r for r in lane if r["step"] > 3], tol=1e-6)


def _resumed(tiny_data, run_dir, extra: dict, ckpt, nproc: int, **layout) -> list[dict]:
    """Steps 4.. of a run resumed from ``ckpt`` on ``nproc`` ranks (1: in this process) with ``layout``."""
    overrides = tiny_overrides(tiny_data, run_dir, **extra, **layout, **{"train.resume": str(ckpt)})
    if nproc == 1:
        run(compose(overrides))
    else:
        proc = launch(overrides, nproc=nproc)
        assert proc.returncode == 0, _why(proc)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(int(ckpt.name.split("_")[1]) + 1, 7))
    return records


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_resume_under_another_layout_continues_the_curve(tiny_data, tmp_path, one_thread):
    """Sharded checkpoints reshard on load: lane 2 -> 1, lane 1 -> 2, dp 1 -> 2 (async saves) and dp 2 -> 1."""
    every_step = {**EXTRA, "train.checkpoint_every": 1, "train.keep_checkpoints": 6}
    one_dir, lane_dir = tmp_path / "one", tmp_path / "lane2"
    run(compose(tiny_overrides(tiny_data, one_dir, **every_step)))
    one = read_metrics(one_dir)
    onward = [r for r in one if r["step"] > 3]
    step3 = ckpt_io.checkpoint_root(one_dir) / ckpt_io.step_dir_name(3)

    # lane 1 -> 2: the one-process checkpoint resumed as shards over two ranks
    lane = _resumed(tiny_data, lane_dir, every_step, step3, nproc=2, **{"parallel.lane": 2})
    _assert_same_curve(lane, onward, tol=2e-5)
    # lane 2 -> 1: that run's step-4 checkpoint (written as two shards) resumed in one process
    lane4 = ckpt_io.checkpoint_root(lane_dir) / ckpt_io.step_dir_name(4)
    assert ckpt_io.load_trainer_state(lane4)["lane"] == 2
    back = _resumed(tiny_data, tmp_path / "back", every_step, lane4, nproc=1)
    _assert_same_curve(back, [r for r in one if r["step"] > 4], tol=2e-5)
    # dp 1 -> 2 with async checkpoints, then dp 2 -> 1 from one of them
    dp_dir = tmp_path / "dp2"
    dp = _resumed(tiny_data, dp_dir, {**every_step, "train.async_checkpoint": True}, step3, nproc=2)
    _assert_same_curve(dp, onward, tol=2e-5)
    dp4 = ckpt_io.checkpoint_root(dp_dir) / ckpt_io.step_dir_name(4)
    assert ckpt_io.checkpoint_damage(dp4) is None and ckpt_io.load_trainer_state(dp4)["world_size"] == 2
    single = _resumed(tiny_data, tmp_path / "single", every_step, dp4, nproc=1)
    _assert_same_curve(single, [r for r in one if r["step"] > 4], tol=2e-5)
    _assert_same_weights(ckpt_io.latest_checkpoint(dp_dir), ckpt_io.latest_checkpoint(one_dir))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_dp_by_lane_mesh_on_four_ranks_equals_one_process(trainer, tiny_data, tmp_path, one_thread):
    """dp 2 x lane 2: each lane pair reads its dp replica's batch, gradients averaged over the dp group only; under
    fsdp, FSDP2 shards the lane shards further over dp. The tiny Burger's classic layer has one KV head for two lane
    ranks, so its K/V gradients need a lane sum, which fully_shard takes off the parameters (parallelize's
    ``sync_grads`` applies it to the dp-reduced gradients)."""
    extra = {**EXTRA, "train.max_steps": 4, "train.eval_every": 2, "train.checkpoint_every": 0, "train.micro_batch": 4}
    mesh_dir, one_dir = tmp_path / "dp2lane2", tmp_path / "one"
    proc = launch(tiny_overrides(tiny_data, mesh_dir, **extra, **{"parallel.lane": 2, "trainer": trainer}), nproc=4)
    assert proc.returncode == 0, _why(proc)
    assert (trainer == "fsdp") == ("FSDP2: fully_shard over dp 2 (lane 2), fp32" in proc.stderr)
    run(compose(tiny_overrides(tiny_data, one_dir, **extra)))
    assert read_summary(mesh_dir)["parallel"] == {"dp": 2, "lane": 2}
    _assert_same_curve(read_metrics(mesh_dir), read_metrics(one_dir), tol=2e-5)
    _assert_same_weights(ckpt_io.latest_checkpoint(mesh_dir), ckpt_io.latest_checkpoint(one_dir))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_vocab_parallel_head_trains_like_the_full_head(tiny_data, tmp_path, one_thread):
    """parallel.vocab_parallel_head=true: each lane rank keeps V/2 head rows and the loss is the vocabulary-parallel
    cross-entropy; the curve and the consolidated weights equal the one-process run's (untied head)."""
    extra = {**EXTRA, "+model.overrides.tie_embeddings": False}
    vp_dir, one_dir = tmp_path / "vp", tmp_path / "one"
    overrides = tiny_overrides(tiny_data, vp_dir, **extra, **{"parallel.lane": 2, "parallel.vocab_parallel_head": True})
    proc = launch(overrides, nproc=2)
    assert proc.returncode == 0, _why(proc)
    assert "vocabulary-parallel head:" in proc.stderr
    run(compose(tiny_overrides(tiny_data, one_dir, **extra)))
    _assert_same_curve(read_metrics(vp_dir), read_metrics(one_dir), tol=2e-5)
    _assert_same_weights(ckpt_io.latest_checkpoint(vp_dir), ckpt_io.latest_checkpoint(one_dir))


def test_vocab_parallel_head_refuses_a_tied_head(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path / "run", **{"parallel.lane": 2, "parallel.vocab_parallel_head": True,
                                                                "+model.overrides.tie_embeddings": True})  # fmt: skip
    with pytest.raises(ValueError, match="tie_embeddings=true"):
        run(compose(overrides))


def test_lane_degree_must_divide_the_world(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"parallel.lane=2 does not divide the world size 1"):
        run(compose(tiny_overrides(tiny_data, tmp_path / "run", **{"parallel.lane": 2})))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_mgrit_two_ranks_tracks_the_serial_run(tiny_data, tmp_path, one_thread):
    """4 decoder layers over 2 ranks, 2 levels, cf 2, FCF, 2 iterations: with the serial final sweep this solve
    is exact up to rounding (docs/mgrit.md), so the tolerance is float-level (1e-4), not a training-noise one."""
    extra = {**EXTRA, **LLAMA, "train.micro_batch": 16, "train.checkpoint_every": 0}
    lp = {"layer_parallel.enabled": True, "layer_parallel.cf": 2, "layer_parallel.check_every": 2}
    lp_dir, one_dir = tmp_path / "lp2", tmp_path / "one"
    proc = launch(tiny_overrides(tiny_data, lp_dir, **extra, **lp), nproc=2)
    assert proc.returncode == 0, _why(proc)
    assert "layer parallel (MGRIT) over 2 rank(s)" in proc.stderr
    run(compose(tiny_overrides(tiny_data, one_dir, **extra)))
    got, want = read_metrics(lp_dir), read_metrics(one_dir)
    assert read_summary(lp_dir)["layer_parallel"] is True and read_summary(lp_dir)["status"] == "completed"
    _assert_same_curve(got, want, tol=1e-4)
    assert _col(want, "train_loss")[-1] < _col(want, "train_loss")[0] - 0.2
    # The monitor's figures: every step solved by MGRIT (not the serial fallback), residuals small, the true
    # gradient error measured on the check_every steps.
    assert all(r["lp/serial"] == 0 for r in got)
    assert all(0 <= r["lp/fwd_residual"] < 1e-3 and 0 <= r["lp/bwd_residual"] < 1e-3 for r in got)
    assert [r["step"] for r in got if "lp/grad_err" in r] == [2, 4, 6]
    assert all(r["lp/grad_err"] < 1e-3 for r in got if "lp/grad_err" in r)
    assert "lp/fwd_residual" not in want[0]


def test_resume_restores_the_mgrit_monitor(tiny_data, tmp_path):
    """What the monitor decided (here: iterations raised to 3) survives a restart; one rank keeps it quick."""
    lp = {"layer_parallel.enabled": True, "layer_parallel.cf": 2}
    first = tmp_path / "first"
    run(compose(tiny_overrides(tiny_data, first, **EXTRA, **LLAMA, **lp)))
    checkpoint = ckpt_io.complete_checkpoints(first)[0]
    assert checkpoint.name == "step_00000003"
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    monitor = state["layer_parallel"]["monitor"]
    assert (monitor["fwd_iters"], monitor["serial"]) == (2, False)  # the configured iterations, saved
    monitor.update(fwd_iters=3, bwd_iters=3, events=[{"step": 3, "action": "add_iters"}])  # as if it had escalated
    torch.save(state, checkpoint / "trainer.pt")
    ckpt_io.write_manifest(checkpoint, 3)  # an edit on purpose: re-sign it, or the resume refuses it as damaged

    resumed = tmp_path / "resumed"
    run(compose(tiny_overrides(tiny_data, resumed, **EXTRA, **LLAMA, **lp, **{"train.resume": str(checkpoint)})))
    after = read_metrics(resumed)
    assert [r["step"] for r in after] == [4, 5, 6]
    assert all(r["lp/fwd_iters"] == 3 and r["lp/bwd_iters"] == 3 for r in after)
    saved_again = torch.load(ckpt_io.latest_checkpoint(resumed) / "trainer.pt", weights_only=True)
    assert saved_again["layer_parallel"]["monitor"]["events"] == [{"step": 3, "action": "add_iters"}]
