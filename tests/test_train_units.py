"""Pieces of the trainer without a training run: schedules, the weight-decay rule, atomic checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from tpblocks.config import OptimConfig, SchedulerConfig
from tpblocks.models import build_model, get_flavor
from tpblocks.train import checkpoint as ckpt_io
from tpblocks.train.optim import build_optimizer, is_decayed
from tpblocks.train.schedulers import build_scheduler, load_scheduler_state


def _lrs(name: str, steps: int, **kw) -> tuple[list[float], torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(name=name, **kw), steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out, sched


def test_cosine_warms_up_then_follows_one_cycle():
    lrs, _ = _lrs("cosine", 100, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # 10% linear warm-up, never 0
    assert lrs[10] == pytest.approx(1.0)
    for i in range(10, 100):  # the cosine written independently: from the peak at update 10 to 0.1 at 100
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 10) / 90))
        assert lrs[i] == pytest.approx(expected)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert 0.1 < lrs[-1] < 0.11


def test_wsd_is_flat_then_decays_linearly():
    lrs, _ = _lrs("wsd", 100, warmup_fraction=0.1, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10:80] == pytest.approx([1.0] * 70)  # stable phase
    assert lrs[80:] == pytest.approx([1 - (i - 80) / 20 for i in range(80, 100)])
    assert lrs[-1] == pytest.approx(0.05)


def test_scheduler_state_round_trip_continues_the_curve():
    full, _ = _lrs("cosine", 40)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(name="cosine"), 40)
    for _ in range(17):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, SchedulerConfig(name="cosine"), 40)
    load_scheduler_state(sched2, sched.state_dict(), 40)
    rest = []
    for _ in range(23):
        rest.append(sched2.get_last_lr()[0])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(full[17:])


def _state_after(name: str, steps: int, taken: int, **kw) -> dict:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(name=name, **kw), steps)
    for _ in range(taken):
        opt.step()
        sched.step()
    return sched.state_dict()


def test_wsd_extension_from_the_stable_phase():
    """A 100-step WSD checkpoint at step 50 resumed for 200 steps: warm-up kept (10), decay moved to 160..200."""
    state = _state_after("wsd", 100, 50)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedulerConfig(name="wsd"), 200)  # fresh: warm-up would be 20 steps
    load_scheduler_state(sched, state, 200)
    lrs = []
    for _ in range(150):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert sched.lr_lambdas[0].warmup_steps == 10 and sched.lr_lambdas[0].max_steps == 200
    assert lrs[: 160 - 50] == pytest.approx([1.0] * 110)  # still stable up to the new decay start
    assert lrs[110:] == pytest.approx([1 - (i - 160) / 40 for i in range(160, 200)])


def test_extension_is_refused_when_it_cannot_be_seamless():
    with pytest.raises(ValueError, match="past the stable phase"):  # already decaying at step 90
        _resume("wsd", _state_after("wsd", 100, 90), 200)
    with pytest.raises(ValueError, match="past the stable phase"):  # shrinking below the current step
        _resume("wsd", _state_after("wsd", 100, 50), 55)
    with pytest.raises(ValueError, match="cosine schedule cannot be stretched"):
        _resume("cosine", _state_after("cosine", 100, 50), 200)
    with pytest.raises(ValueError, match="scheduler=wsd"):
        _resume("cosine", _state_after("wsd", 100, 50), 100)


def _resume(name: str, state: dict, steps: int) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    load_scheduler_state(build_scheduler(opt, SchedulerConfig(name=name), steps), state, steps)


def test_weight_decay_on_matrices_only():
    model = build_model(get_flavor("debug_burger"))
    names = dict(model.named_parameters())
    decayed = {n for n, p in names.items() if is_decayed(n, p)}
    assert "tok_embeddings.weight" in decayed  # the tied embedding/head is a matrix: decayed
    assert any(n.endswith(".wq") for n in decayed) and any(n.endswith("w_down") for n in decayed)
    for n in names:
        if "norm" in n or n.endswith(".gate"):
            assert n not in decayed, n  # (lanes, width) norm gains and reception gates are 2-D/3-D yet not decayed
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_parameters()  # every parameter once (tied weights not duplicated)


def test_checkpoint_publish_is_atomic_and_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        tmp = ckpt_io.prepare_tmp(tmp_path, step)
        assert tmp.name.startswith(".tmp_") and ckpt_io.latest_checkpoint(tmp_path) != tmp
        ckpt_io.write_trainer_state(tmp, {"step": step})
        (tmp / "dcp").mkdir()
        (tmp / "dcp" / ".metadata").write_bytes(b"")
        ckpt_io.publish(tmp_path, step, keep=2)
    names = [p.name for p in ckpt_io.complete_checkpoints(tmp_path)]
    assert names == ["step_00000004", "step_00000006"]
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_00000006"
    # A crash while writing step 8 leaves a temp dir that is never taken for a checkpoint...
    half = ckpt_io.prepare_tmp(tmp_path, 8)
    torch.save({"partial": True}, half / "trainer.pt")
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_00000006"
    assert ckpt_io.resolve_resume("auto", tmp_path).name == "step_00000006"
    # ...and a lost `latest` pointer falls back to the highest complete step.
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_00000006"
    assert ckpt_io.resolve_resume("none", tmp_path) is None
    with pytest.raises(ValueError, match="train.resume"):
        ckpt_io.resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_a_checkpoint_of_the_old_layout_is_named_as_such(tmp_path):
    old = tmp_path / "checkpoints" / "step_00000004"
    old.mkdir(parents=True)
    torch.save({"format": "tpblocks-trainer", "version": 1}, old / "trainer.pt")
    torch.save({"format": "tpblocks-model"}, old / "model.pt")
    assert "layout before sharded checkpoints" in ckpt_io.checkpoint_damage(old)
    with pytest.raises(ValueError, match=r"is damaged \(it has the layout before sharded checkpoints"):
        ckpt_io.resolve_resume(str(old), tmp_path)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt_io.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    ckpt_io.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_a_non_finite_gradient_norm_stops_before_the_update():
    from test_train_support import compose

    from tpblocks.config import RunConfig
    from tpblocks.parallel import parallel_dims, parallelize
    from tpblocks.train.distributed import NonFiniteGradNorm, TorchBackend, dist_env

    cfg = RunConfig.from_dictconfig(compose(["run_dir=/tmp/unused"]))
    model = torch.nn.Linear(3, 2)
    par = parallelize(model, parallel_dims(cfg, 1), cfg, torch.device("cpu"))
    backend = TorchBackend(par, torch.optim.AdamW(model.parameters()), cfg, dist_env("cpu"), accum=1)
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteGradNorm, match="gradient norm is nan"):
        backend.update()
    assert torch.equal(model.weight, before)  # the optimizer never ran
    model.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    assert backend.update() > 0 and not torch.equal(model.weight, before) and model.weight.grad is None


def test_the_trainer_has_no_layout_or_backend_branches():
    """The trainer reads as the step: which layout or backend runs is tpblocks.parallel.parallelize's business
    (and the backend's), so no ``if`` in trainer.py asks for a mode, a backend name or MGRIT."""
    import ast
    import re
    from pathlib import Path

    import tpblocks.train.trainer as trainer

    asks = re.compile(r"\.mode\b|backend\b|deepspeed|fsdp|ddp|\blp\b|layer_parallel|\.lane\b|lane_enabled|is_ddp")
    tree = ast.parse(Path(trainer.__file__).read_text())
    tests = [ast.unparse(n.test) for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.While))]
    assert len(tests) > 10  # the walk really sees the trainer's conditions
    # The one exception decides nothing: it says in the log that a resume reshards.
    logs_only = "(state['lane'], state['world_size']) != (self.dims.lane, env.world)"
    assert [t for t in tests if asks.search(t)] == [logs_only]
    assert asks.search("cfg.trainer.backend == 'deepspeed'") and asks.search("self.lp is not None")
