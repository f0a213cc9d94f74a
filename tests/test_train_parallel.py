"""Lane-parallel and layer-parallel (MGRIT) training through the real entry point (torchrun, 2 ranks, gloo).

* ``parallel.lane=2``: the model is sharded over both ranks (TP-block lanes for Burger, Megatron shards for
  Llama); at the same effective batch the losses equal the one-process run's, the checkpoint's model.pt is the
  FULL model (loads in one process and equals the one-process run's weights), and a resume from it continues
  the same curve. On 4 ranks, a dp 2 x lane 2 mesh gives the same curve too.
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
    a, b = load_model(a_dir), load_model(b_dir)
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
    assert "lane parallel: dp 1 x lane 2" in proc.stderr
    run(compose(tiny_overrides(tiny_data, one_dir, **extra)))
    summary = read_summary(lane_dir)
    assert summary["status"] == "completed" and summary["parallel"] == {"dp": 1, "lane": 2}
    lane, one = read_metrics(lane_dir), read_metrics(one_dir)
    assert [r["step"] for r in lane] == list(range(1, 7))
    _assert_same_curve(lane, one, tol=2e-5)
    assert _col(one, "train_loss")[-1] < _col(one, "train_loss")[0] - 0.2  # it learns: equal curves mean equal updates

    # model.pt holds the full model (not rank 0's shard) and equals the one-process weights.
    latest = ckpt_io.latest_checkpoint(lane_dir)
    assert {p.name for p in latest.iterdir()} >= {"model.pt", "trainer.pt", "optimizer_lane0.pt", "optimizer_lane1.pt"}
    _assert_same_weights(latest, ckpt_io.latest_checkpoint(one_dir))
    assert ckpt_io.load_trainer_state(latest)["lane"] == 2

    if model != "debug_burger":
        return
    # Resume from step 3 in a new run dir: full state -> shards, per-lane optimizer files; same curve onward.
    resumed = tmp_path / "resumed"
    step3 = ckpt_io.checkpoint_root(lane_dir) / ckpt_io.step_dir_name(3)
    overrides = tiny_overrides(tiny_data, resumed, **extra, **{"parallel.lane": 2, "train.resume": str(step3)})
    proc = launch(overrides, nproc=2)
    assert proc.returncode == 0, _why(proc)
    after = read_metrics(resumed)
    assert [r["step"] for r in after] == [4, 5, 6]
    _assert_same_curve(after, [r for r in lane if r["step"] > 3], tol=1e-6)

    # A different lane degree cannot take the per-lane optimizer state: a clear error, not a shape mismatch.
    with pytest.raises(ValueError, match=r"parallel.lane=2 but this run has parallel.lane=1"):
        run(compose(tiny_overrides(tiny_data, tmp_path / "bad", **extra, **{"train.resume": str(step3)})))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_dp_by_lane_mesh_on_four_ranks_equals_one_process(tiny_data, tmp_path, one_thread):
    """dp 2 x lane 2: each lane pair reads its dp replica's batch, gradients averaged over the dp group only."""
    extra = {**EXTRA, "train.max_steps": 4, "train.eval_every": 2, "train.checkpoint_every": 0, "train.micro_batch": 4}
    mesh_dir, one_dir = tmp_path / "dp2lane2", tmp_path / "one"
    proc = launch(tiny_overrides(tiny_data, mesh_dir, **extra, **{"parallel.lane": 2}), nproc=4)
    assert proc.returncode == 0, _why(proc)
    run(compose(tiny_overrides(tiny_data, one_dir, **extra)))
    assert read_summary(mesh_dir)["parallel"] == {"dp": 2, "lane": 2}
    _assert_same_curve(read_metrics(mesh_dir), read_metrics(one_dir), tol=2e-5)
    _assert_same_weights(ckpt_io.latest_checkpoint(mesh_dir), ckpt_io.latest_checkpoint(one_dir))


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
    lp = {"layer_parallel.enabled": True, "layer_parallel.cf": 2, "+layer_parallel.check_every": 2}
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
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
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
    saved_again = torch.load(ckpt_io.latest_checkpoint(resumed) / "trainer.pt", weights_only=False)
    assert saved_again["layer_parallel"]["monitor"]["events"] == [{"step": 3, "action": "add_iters"}]
