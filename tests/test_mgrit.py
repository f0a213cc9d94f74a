"""Layer-parallel training by MGRIT (tpblocks.parallel.mgrit).

Single process: config validation, grid layout, 1 rank == serial bit for bit, the algorithm's convergence
(``force_mgrit`` runs MGRIT on one rank), adjoint gradients, TP-block lanes, KV-cache decoding, the monitor.
Two gloo ranks: forward and backward equal the serial pass with enough iterations (and not with too few),
training with MGRIT + monitor reaches the serial loss, and the monitor's switch to serial happens on both ranks.
References are always the plain serial model (ordinary autograd), never the MGRIT code itself.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_workers, same_on_all_ranks

from tpblocks.models import ModelConfig, build_model
from tpblocks.parallel.mgrit import (
    Hierarchy,
    MGRITConfig,
    MGRITMonitor,
    MGRITStack,
    analytic_speedup,
    apply_layer_parallel,
    partition,
)
from tpblocks.parallel.mgrit.monitor import ADD_ITERS, NONE, SERIAL


def tiny_llama(n_layers: int = 16, width: int = 32, init_std: float = 0.1, seed: int = 0):
    # init_std 0.1 (not the default 0.02) makes the residual branches large enough that MGRIT needs several
    # iterations: with tiny branches one iteration is already exact to 1e-5 and the tests could not fail.
    cfg = ModelConfig(
        arch="llama", vocab_size=64, hidden_size=width, n_heads=4, n_kv_heads=2, n_layers=n_layers,
        max_seq_len=32, init_std=init_std,
    )  # fmt: skip
    torch.manual_seed(seed)
    return build_model(cfg)


def tokens(b: int = 2, s: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, tok: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def serial_loss_and_grads(model, tok):
    params = list(model.parameters())
    loss = lm_loss(model, tok)
    return loss.detach(), flat(torch.autograd.grad(loss, params))


def mgrit_loss_and_grads(model, tok, lp_cfg: dict, force: bool = True):
    lp = apply_layer_parallel(model, {"enabled": True, "max_iters": 32, **lp_cfg})
    for stack in lp.stacks:
        stack.force_mgrit = force
    try:
        loss = lm_loss(model, tok)
        grads = flat(torch.autograd.grad(loss, list(model.parameters())))
        return loss.detach(), grads, lp.stats()
    finally:
        lp.remove()


# ---------------------------------------------------------------------------------------------- config and grid
@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("levels", 0, "levels=0"),
        ("cf", 1, "cf=1"),
        ("iters", 0, "iters=0"),
        ("relax", "FF", "relax='FF'"),
        ("tol", -1.0, "tol=-1.0"),
        ("policy", "panic", "policy='panic'"),
        ("unit", "heads", "unit='heads'"),
        ("max_iters", 1, "max_iters=1"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, fragment):
    kwargs = {field: value}
    if field == "max_iters":
        kwargs["iters"] = 3
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        MGRITConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\[.levles.\\]"):
        MGRITConfig.from_dict({"enabled": True, "levles": 3})
    cfg = MGRITConfig.from_dict({"enabled": True, "levels": 3, "cf": 2, "iters": 3, "tol": 1e-6, "relax": "F"})
    assert MGRITConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.adjoint_iters == 3 and cfg.replace(bwd_iters=5).adjoint_iters == 5


def test_partition_is_contiguous_balanced_and_validated():
    assert partition(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert partition(16, 2) == [(0, 8), (8, 16)]
    with pytest.raises(ValueError, match="3 layers but the layer-parallel group has 4 ranks"):
        partition(3, 4)


def test_hierarchy_keeps_rank_boundaries_as_c_points_on_every_level():
    h = Hierarchy.build(8, 19, cf=2, levels=3)  # a rank owning steps 8..18 (points 8..19)
    assert h.points[0] == tuple(range(8, 20))
    assert h.points[1] == (8, 10, 12, 14, 16, 18, 19)
    assert h.points[2] == (8, 12, 16, 19)
    m = h.mirrored(19)
    assert m.points[0] == tuple(range(0, 12)) and m.points[2] == (0, 3, 7, 11)


def test_analytic_speedup_grows_with_ranks_and_reduces_to_serial_counts():
    one = analytic_speedup(64, 1, cf=4, levels=1, iters=1)
    assert one["mgrit"] == pytest.approx(64 * 2.0 + 64 + 64)  # pipeline fwd + bwd + graph builds: no gain
    speedups = [analytic_speedup(64, p, cf=4, levels=2, iters=1, relax="F")["speedup"] for p in (2, 4, 8, 16)]
    assert all(b > a for a, b in zip(speedups, speedups[1:]))
    assert speedups[0] < 1 < speedups[-1]


# ---------------------------------------------------------------------------------------------- one process
def test_one_rank_is_exactly_the_serial_model():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    tok = tokens()
    loss_ref, g_ref = serial_loss_and_grads(reference, tok)
    lp = apply_layer_parallel(model, {"enabled": True, "levels": 3, "cf": 2, "iters": 1})
    assert lp.enabled and lp.stacks[0].world == 1 and not lp.stacks[0].uses_mgrit()
    loss, g = serial_loss_and_grads(model, tok)
    assert torch.equal(loss, loss_ref)
    assert torch.equal(g, g_ref)
    assert lp.stats() == {}  # nothing ran by MGRIT
    # The model keeps its parameter names (checkpoints load either way).
    assert list(model.state_dict()) == list(reference.state_dict())


def test_disabled_config_changes_nothing():
    model = tiny_llama(n_layers=4)
    lp = apply_layer_parallel(model, {"enabled": False})
    assert not lp.enabled and lp.step_end(0, 1.0) == {}
    assert "forward" not in model.stages[0].__dict__


@pytest.mark.parametrize("levels, relax", [(2, "F"), (2, "FCF"), (3, "F"), (3, "FCF")])
def test_mgrit_converges_to_the_serial_pass_on_one_rank(levels, relax):
    model = tiny_llama()
    tok = tokens()
    loss_ref, g_ref = serial_loss_and_grads(model, tok)
    errors = []
    for iters in (1, 3, 10):
        # final_sweep="F" keeps the textbook MGRIT iterate (the default serial sweep is exact on one rank).
        cfg = {"levels": levels, "cf": 2, "iters": iters, "relax": relax, "final_sweep": "F"}
        loss, g, st = mgrit_loss_and_grads(model, tok, cfg)
        errors.append(rel(g, g_ref))
        assert len(st["fwd_residuals"]) == iters and len(st["bwd_residuals"]) == iters
        assert st["fwd_residuals"][-1] < st["fwd_residuals"][0] or iters == 1
    assert errors[0] > 1e-3, "one iteration should be visibly inexact on this model"
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4
    assert abs(float(loss - loss_ref)) < 1e-4


def test_two_level_f_relaxation_is_exact_after_as_many_iterations_as_coarse_intervals():
    # MGRIT's exactness property: iteration k makes the first k coarse intervals exact. 16 layers, cf 4: 4.
    model = tiny_llama()
    tok = tokens()
    loss_ref, g_ref = serial_loss_and_grads(model, tok)
    cfg = {"levels": 2, "cf": 4, "iters": 4, "relax": "F", "final_sweep": "F"}
    loss, g, _ = mgrit_loss_and_grads(model, tok, cfg)
    assert rel(g, g_ref) < 2e-5
    assert abs(float(loss - loss_ref)) < 1e-5
    _, g3, _ = mgrit_loss_and_grads(model, tok, {**cfg, "iters": 3})
    assert rel(g3, g_ref) > 1e-4


def test_stack_wrapper_gradients_match_autograd_for_input_and_parameters():
    model = tiny_llama(n_layers=12, init_std=0.05)
    layers = model.stages
    # The plain wrapper form: DecoderLayers get a LocalComm by default.
    stack = MGRITStack(layers, MGRITConfig(levels=2, cf=3, iters=6, relax="FCF", final_sweep="F"), force_mgrit=True)
    x = torch.randn(2, 7, 32, requires_grad=True)
    gy = torch.randn(2, 7, 32)
    params = list(stack.parameters())
    y_ref = x
    for layer in layers:
        y_ref = layer(y_ref, model.comm)
    g_ref = torch.autograd.grad(y_ref, [x, *params], gy)
    y = stack(x)
    g = torch.autograd.grad(y, [x, *params], gy)
    assert rel(y, y_ref) < 1e-5
    assert rel(g[0], g_ref[0]) < 1e-5
    assert rel(flat(g[1:]), flat(g_ref[1:])) < 1e-5


def test_dt_below_one_is_forward_euler_with_that_step():
    model = tiny_llama(n_layers=6)
    cfg = MGRITConfig(dt=0.5, levels=2, cf=2, iters=6, final_sweep="F")
    call = lambda m, h: type(m).forward(m, h, model.comm)  # noqa: E731
    x = torch.randn(1, 5, 32)
    ref = x
    for layer in model.stages:
        ref = ref + 0.5 * (layer(ref, model.comm) - ref)
    serial = MGRITStack(model.stages, cfg, call=call)(x)
    mgrit = MGRITStack(model.stages, cfg, call=call, force_mgrit=True)(x)
    assert torch.allclose(serial, ref, atol=1e-6)
    assert rel(mgrit, ref) < 1e-5


@pytest.mark.parametrize("recipe", ["burger", "sandwich"])
def test_tp_block_lane_stack(recipe):
    cfg = ModelConfig(
        arch="tp_blocks", recipe=recipe, vocab_size=64, hidden_size=32, n_heads=4, n_kv_heads=2, lane_count=2,
        lane_depth=8, tp_block_repetition=2, n_classic_layers=1, lane_n_heads=2, lane_n_kv_heads=1,
        max_seq_len=32, init_std=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    tok = tokens()
    loss_ref, g_ref = serial_loss_and_grads(model, tok)
    loss, g, st = mgrit_loss_and_grads(model, tok, {"unit": "lanes", "cf": 2, "iters": 8, "final_sweep": "F"})
    assert len(st["fwd_residuals"]) == 8
    assert rel(g, g_ref) < 1e-4 and abs(float(loss - loss_ref)) < 1e-5
    _, g1, _ = mgrit_loss_and_grads(model, tok, {"unit": "lanes", "cf": 2, "iters": 1, "final_sweep": "F"})
    assert rel(g1, g_ref) > 1e-4
    # Whole TP blocks as steps ("stages") work for this architecture too.
    loss_s, g_s, _ = mgrit_loss_and_grads(model, tok, {"unit": "stages", "cf": 2, "iters": 4, "final_sweep": "F"})
    assert rel(g_s, g_ref) < 1e-4


def test_lanes_unit_rejects_delayed_communication_and_llama():
    cfg = ModelConfig(
        arch="tp_blocks", vocab_size=64, hidden_size=32, lane_count=2, lane_depth=4, lane_n_heads=2,
        lane_n_kv_heads=1, delayed_comm=True, comm_start=0, comm_length=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="delayed communication"):
        apply_layer_parallel(build_model(cfg), {"enabled": True, "unit": "lanes"})
    with pytest.raises(ValueError, match="needs arch='tp_blocks'"):
        apply_layer_parallel(tiny_llama(n_layers=2), {"enabled": True, "unit": "lanes"})


def test_evaluation_without_autograd_is_serial_unless_asked_otherwise():
    model = tiny_llama(n_layers=8)
    tok = tokens()
    with torch.no_grad():
        ref = lm_loss(model, tok)
        for eval_serial, exact in ((True, True), (False, False)):
            cfg = {"enabled": True, "cf": 2, "iters": 1, "relax": "F", "final_sweep": "F", "eval_serial": eval_serial}
            lp = apply_layer_parallel(model, cfg)
            lp.stacks[0].force_mgrit = True
            assert torch.equal(lm_loss(model, tok), ref) == exact
            lp.remove()


def test_kv_cache_decoding_runs_the_exact_serial_model():
    model = tiny_llama(n_layers=6)
    reference = copy.deepcopy(model)
    lp = apply_layer_parallel(model, {"enabled": True, "cf": 2})
    lp.stacks[0].force_mgrit = True
    tok = tokens(1, 6)
    cache, cache_ref = model.new_cache(16), reference.new_cache(16)
    with torch.no_grad():
        assert torch.equal(model(tok, cache), reference(tok, cache_ref))
        nxt = tok[:, -1:]
        assert torch.equal(model(nxt, cache), reference(nxt, cache_ref))
    lp.remove()
    assert "forward" not in model.stages[0].__dict__


# ---------------------------------------------------------------------------------------------- monitor
def test_monitor_adds_iterations_then_switches_to_serial():
    mon = MGRITMonitor(MGRITConfig(enabled=True, iters=2, max_iters=3, grad_tol=0.1, plateau_window=0))
    assert mon.decide(0, 3.0, grad_err_est=0.05) == NONE
    assert mon.decide(1, 3.0, grad_err_est=0.2) == ADD_ITERS
    mon.apply(1, ADD_ITERS, {"grad_err_est": 0.2})
    assert (mon.state.fwd_iters, mon.state.bwd_iters, mon.state.serial) == (3, 3, False)
    assert mon.decide(2, 3.0, grad_err_est=0.2) == SERIAL  # at max_iters: nothing left but serial
    mon.apply(2, SERIAL, {"grad_err_est": 0.2})
    assert mon.state.serial and mon.decide(3, 3.0, grad_err_est=9.0) == NONE
    assert [e["action"] for e in mon.events] == ["add_iters", "serial"]
    # An exact measurement overrides the estimate.
    fresh = MGRITMonitor(MGRITConfig(enabled=True, grad_tol=0.1, policy="serial", plateau_window=0))
    assert fresh.decide(0, None, grad_err_est=0.5, grad_err=0.01) == NONE
    assert fresh.decide(0, None, grad_err_est=0.01, grad_err=0.5) == SERIAL


def test_monitor_state_round_trips_and_reaches_every_stack():
    """A resumed run must not forget raised iterations, the serial switch or the plateau window."""
    cfg = {"enabled": True, "cf": 2, "iters": 1, "max_iters": 4, "grad_tol": 0.1, "plateau_window": 2}
    lp = apply_layer_parallel(tiny_llama(n_layers=4), cfg)
    lp.monitor.apply(0, ADD_ITERS, {"grad_err_est": 0.2})  # forward/adjoint iterations 1 -> 2
    for step, loss in enumerate([2.9, 2.9, 2.9], start=1):  # three of the four losses a plateau verdict needs
        assert lp.monitor.decide(step, loss, grad_err_est=0.05) == NONE
    saved = copy.deepcopy(lp.state_dict())

    again = apply_layer_parallel(tiny_llama(n_layers=4), cfg)
    assert again.stacks[0].fwd_iters == 1
    again.load_state_dict(saved)
    assert again.monitor.state == lp.monitor.state and again.monitor.events == lp.monitor.events
    assert [(s.fwd_iters, s.bwd_iters, s.serial) for s in again.stacks] == [(2, lp.monitor.state.bwd_iters, False)]
    # The loss window carries over: the fourth flat loss completes the plateau in the restored monitor too.
    assert again.monitor.decide(4, 2.9, grad_err_est=0.05) == ADD_ITERS


def test_monitor_escalates_on_a_loss_plateau_only_when_the_error_matters():
    cfg = MGRITConfig(enabled=True, grad_tol=0.5, plateau_window=5, plateau_rel=0.01, plateau_grad_tol=0.02)
    falling = MGRITMonitor(cfg)
    assert all(falling.decide(i, 3.0 - 0.1 * i, grad_err_est=0.1) == NONE for i in range(20))
    flat_small_err = MGRITMonitor(cfg)
    assert all(flat_small_err.decide(i, 1.0, grad_err_est=0.01) == NONE for i in range(20))
    flat_big_err = MGRITMonitor(cfg)
    actions = [flat_big_err.decide(i, 1.0, grad_err_est=0.1) for i in range(10)]
    assert actions[:9] == [NONE] * 9 and actions[9] == ADD_ITERS  # needs two full windows to call a plateau


def test_training_with_the_monitor_switches_to_serial_and_logs_it(caplog):
    model = tiny_llama(n_layers=8)
    lp = apply_layer_parallel(
        model, {"enabled": True, "cf": 2, "iters": 1, "relax": "F", "final_sweep": "F", "grad_tol": 1e-3,
                "max_iters": 2, "policy": "add_iters", "plateau_window": 0, "check_every": 2},
    )  # fmt: skip
    lp.stacks[0].force_mgrit = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tok = tokens(4, 12)
    modes = []
    with caplog.at_level(logging.INFO, logger="tpblocks.parallel.mgrit"):
        for step in range(4):
            loss = lm_loss(model, tok)
            loss.backward()
            modes.append(lp.stacks[0].last_stats["mode"])
            if lp.should_check(step):
                exact = lp.measure_grad_error(lambda: lm_loss(model, tok))
                assert exact > 1e-3
            metrics = lp.step_end(step, loss.item())
            opt.step()
            opt.zero_grad()
    assert modes == ["mgrit", "mgrit", "serial", "serial"]
    assert [e["action"] for e in lp.monitor.events] == ["add_iters", "serial"]
    assert metrics["lp/serial"] == 1 and lp.stacks[0].serial
    assert "grad_err" in lp.monitor.events[0] and "switched to serial training" in caplog.text
    assert "lp/fwd_residual" in lp.monitor.history[0] and lp.monitor.history[0]["lp/fwd_iters"] == 1


# ---------------------------------------------------------------------------------------------- two gloo ranks
def _parity_worker(rank: int, world: int) -> None:
    model = tiny_llama(n_layers=16, width=32)  # same seed on every rank: replicated weights
    tok = tokens()
    loss_ref, g_ref = serial_loss_and_grads(model, tok)
    cases = [  # (config, expect exact to 1e-5?)
        ({"levels": 2, "cf": 4, "iters": 1, "relax": "F", "final_sweep": "F"}, False),
        ({"levels": 2, "cf": 2, "iters": 8, "relax": "FCF"}, True),
        ({"levels": 3, "cf": 2, "iters": 8, "relax": "F", "final_sweep": "F"}, True),
        ({"levels": 2, "cf": 4, "iters": 2, "relax": "FCF", "final_sweep": "serial"}, True),
    ]
    for cfg, exact in cases:
        loss, g, st = mgrit_loss_and_grads(model, tok, cfg, force=False)
        assert st and len(st["fwd_residuals"]) == cfg["iters"], (cfg, st)  # MGRIT did run, not the serial loop
        assert same_on_all_ranks(g) and same_on_all_ranks(loss.reshape(1)), cfg
        err = rel(g, g_ref)
        if exact:
            assert err < 1e-5 and abs(float(loss - loss_ref)) < 1e-5, (cfg, err, float(loss - loss_ref))
            assert st["grad_err_est"] < 1e-4, (cfg, st)
        else:
            assert err > 1e-3, (cfg, err)
            assert st["grad_err_est"] > 1e-3, (cfg, st)  # the monitor's estimate sees it too
            assert st["fwd_residuals"][0] > 1e-3


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_forward_and_backward_equal_the_serial_pass():
    run_workers(_parity_worker, world=2)


TRAIN_STEPS = 20
LOSS_RTOL = 0.05  # MGRIT + monitor must end within 5% of the serial run's final loss (measured here: -2.2%)


def _train(lp_cfg: dict, rank: int, steps: int = TRAIN_STEPS):
    model = tiny_llama(n_layers=8, width=32)
    tok = tokens(8, 17)
    lp = apply_layer_parallel(model, lp_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, modes = [], []
    for step in range(steps):
        loss = lm_loss(model, tok)
        loss.backward()
        modes.append(lp.stacks[0].last_stats.get("mode") if lp.stacks else "off")
        if lp.should_check(step):
            lp.measure_grad_error(lambda: lm_loss(model, tok))
        lp.step_end(step, loss.item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, modes, lp


def _training_worker(rank: int, world: int) -> None:
    serial, _, _ = _train({"enabled": False}, rank)
    cfg = {"enabled": True, "levels": 2, "cf": 2, "iters": 1, "relax": "F", "grad_tol": 0.05, "max_iters": 4,
           "check_every": 10, "plateau_window": 5}  # fmt: skip
    mgrit, modes, lp = _train(cfg, rank)
    assert modes[0] == "mgrit" and lp.monitor.events and lp.monitor.events[0]["action"] == "add_iters"
    assert serial[-1] < 0.6 * serial[0], serial  # the run does learn
    assert abs(mgrit[-1] - serial[-1]) <= LOSS_RTOL * serial[-1], (mgrit[-1], serial[-1])
    # Without the monitor the same solver settings stay biased and miss the tolerance (measured here: +37%).
    unmonitored, _, _ = _train({**cfg, "monitor": False, "check_every": 0}, rank)
    assert unmonitored[-1] - serial[-1] > LOSS_RTOL * serial[-1], (unmonitored[-1], serial[-1])
    # The monitor's switch, on both ranks at the same step: one iteration is far too inexact for grad_tol 1e-3.
    strict = {**cfg, "policy": "serial", "grad_tol": 1e-3, "check_every": 0}
    _, modes, lp = _train(strict, rank, steps=3)
    assert modes == ["mgrit", "serial", "serial"], modes
    assert [e["action"] for e in lp.monitor.events] == ["serial"] and lp.monitor.events[0]["step"] == 0
    assert same_on_all_ranks(torch.tensor([len(lp.monitor.events), int(lp.serial)]))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_training_with_monitor_reaches_the_serial_loss_and_switches():
    run_workers(_training_worker, world=2)
