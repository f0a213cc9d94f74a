"""The decode-time model for every communication schedule: sync counts, bytes read, exposed overlapped syncs."""

import pytest
import torch

from tpblocks.infer import perfmodel as pm
from tpblocks.models import build_model, get_flavor

SCHEDULE_FLAVORS = (
    "debug_llama",
    "debug_palm",
    "debug_ladder",
    "debug_kraken",
    "debug_track",
    "debug_burger",
    "debug_dtp",
)


@pytest.mark.parametrize("flavor", SCHEDULE_FLAVORS)
def test_predicted_syncs_equal_the_counted_decode_step(flavor):
    cfg = get_flavor(flavor)
    model = build_model(cfg).eval()
    cache = model.new_cache(16)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 4)), cache)
        model.comm.counter.reset()
        model(torch.randint(0, cfg.vocab_size, (1, 1)), cache)
    assert pm.syncs_for_config(cfg) == model.comm.counter.blocking
    assert pm.overlapped_syncs_for_config(cfg) == model.comm.counter.overlapped


@pytest.mark.parametrize("flavor", SCHEDULE_FLAVORS[:-1])
def test_named_shape_rules_agree_with_the_models_sync_plan(flavor):
    """``perfmodel.SCHEDULES`` (shape-only rules for the report's examples) say what the stages declare."""
    cfg = get_flavor(flavor, n_classic_layers=1) if flavor in ("debug_track", "debug_burger") else get_flavor(flavor)
    shape = dict(n_layers=cfg.n_layers, tp_block_repetition=cfg.tp_block_repetition,
                 n_classic_layers=cfg.n_classic_layers)  # fmt: skip
    assert pm.syncs_per_token(pm.schedule_name(cfg), **shape) == pm.syncs_for_config(cfg), flavor
    assert pm.syncs_per_token(pm.schedule_name(cfg), vocab_parallel_head=True, **shape) == pm.syncs_for_config(
        cfg, vocab_parallel_head=True
    )


@pytest.mark.parametrize("flavor", SCHEDULE_FLAVORS)
def test_bytes_read_on_one_device_are_the_model_parameters(flavor):
    """One device, no KV cache: layer weights + head (tied: the table is read once, as the head) = every parameter."""
    cfg = get_flavor(flavor, tie_embeddings=True)  # debug_dtp is untied like Laneformer; the others already tied
    b = pm.decode_bytes(cfg, devices=1, context=0, precision=4)
    params = build_model(cfg).num_parameters()
    assert b.layer_weights + b.head == pytest.approx(4 * params, rel=1e-12)


@pytest.mark.parametrize("flavor", ("debug_kraken", "debug_track"))
def test_lane_schedules_split_their_lanes_over_devices(flavor):
    cfg = get_flavor(flavor)
    one, two = (pm.decode_bytes(cfg, devices=g, context=64).layer_weights for g in (1, 2))
    assert 0.5 * one < two < one  # lanes halve, the replicated rest (Kraken's proj, norm) does not
    with pytest.raises(ValueError, match="lane_count"):
        pm.decode_bytes(cfg.replace(lane_count=3, lane_n_heads=2) if flavor == "debug_kraken" else cfg, devices=4)


def test_overlapped_syncs_cost_what_their_hiding_work_leaves():
    cfg = get_flavor("debug_ladder")
    slow_sync = pm.get_hardware("h100").replace(t_sync=1.0)  # nothing can hide a 1 s sync
    fast_sync = pm.get_hardware("h100").replace(t_sync=1e-15)
    n = pm.overlapped_syncs_for_config(cfg)
    assert pm.exposed_overlapped_time(cfg, slow_sync, devices=2) == pytest.approx(n * 1.0, rel=1e-6)
    assert pm.exposed_overlapped_time(cfg, fast_sync, devices=2) == pytest.approx(1e-15)  # Ladder's last sum
    assert pm.exposed_overlapped_time(cfg, fast_sync, devices=2, hides=False) == pytest.approx(n * 1e-15)
    assert pm.exposed_overlapped_time(cfg, slow_sync, devices=1) == 0.0


def test_predictions_order_the_schedules_as_their_sync_counts():
    """Same bytes (same dense layers): Llama-TP (2L blocking) > PaLM (L) > Ladder (hidden) > no communication.

    At 7B-like width one sub-layer takes longer to read than a sync, so Ladder hides all but its last sum."""
    hw = pm.get_hardware("h100")
    base = get_flavor("debug_llama", n_layers=8, hidden_size=4096, n_heads=32, n_kv_heads=8, vocab_size=32000)
    t = {arch: pm.predict(base.replace(arch=arch), hw, devices=2).t_decode for arch in ("llama", "palm", "ladder")}
    ceiling = pm.predict(base, hw, devices=2, communicate=False).t_decode
    assert t["llama"] > t["palm"] > t["ladder"] > ceiling
    assert t["ladder"] - ceiling == pytest.approx(hw.t_sync, rel=1e-3)  # the last sum has nothing to hide behind
    kraken = get_flavor("debug_kraken", n_layers=8)
    pred = pm.predict(kraken, hw, devices=2)
    assert pred.syncs == 1 and pred.t_sync_total >= hw.t_sync
    assert pm.schedule_name(kraken) == "kraken" and pm.schedule_name(get_flavor("debug_track")) == "track"
