"""Schedule families at matched parameters: same depth, same count, the schedule each name promises."""

import pytest
import torch

from tpblocks.infer import perfmodel as pm
from tpblocks.models import build_model, get_flavor
from tpblocks.models.flavors import FLAVORS
from tpblocks.models.schedule_flavors import SCHEDULE_NAMES, schedule_config, tiny_base
from tpblocks.models.sizing import total_parameters


@pytest.mark.parametrize("scale", ["tiny", "150m"])
def test_every_schedule_is_registered_at_matched_parameters_and_depth(scale):
    cfgs = {name: get_flavor(f"schedule_{name}_{scale}") for name in SCHEDULE_NAMES}
    budget = cfgs["llama"].extra["budget"]
    for name, cfg in cfgs.items():
        assert abs(total_parameters(cfg) - budget) <= 0.01 * budget, f"{name}: {total_parameters(cfg):,} vs {budget:,}"
        assert cfg.n_decoder_layers == cfgs["llama"].n_decoder_layers, name
        assert pm.schedule_name(cfg) == ("llama_tp" if name == "llama" else "tp_blocks" if name == "burger" else name)
    depth = cfgs["llama"].n_layers
    assert pm.syncs_for_config(cfgs["palm"]) == depth == pm.syncs_for_config(cfgs["llama"]) // 2
    assert pm.syncs_for_config(cfgs["ladder"]) == 0 and pm.overlapped_syncs_for_config(cfgs["ladder"]) == 2 * depth
    assert pm.syncs_for_config(cfgs["kraken"]) == 1 and pm.syncs_for_config(cfgs["burger"]) == 1
    assert pm.syncs_for_config(cfgs["track"]) == depth // cfgs["track"].lane_depth


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_tiny_schedules_build_and_decode(name):
    cfg = get_flavor(f"schedule_{name}_tiny")
    model = build_model(cfg)
    assert model.num_parameters() == total_parameters(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (2, 7)))
    assert logits.shape == (2, 7, cfg.vocab_size) and torch.isfinite(logits).all()


def test_bad_family_arguments_are_named():
    with pytest.raises(ValueError, match="schedule='gpt'"):
        schedule_config("gpt", tiny_base())
    with pytest.raises(ValueError, match="degree=3"):
        schedule_config("kraken", tiny_base(), degree=3)
    with pytest.raises(ValueError, match="track_depth=3"):
        schedule_config("track", tiny_base(), track_depth=3)
    with pytest.raises(ValueError, match="arch='palm'"):
        schedule_config("palm", tiny_base().replace(arch="palm"))
    assert all(f"schedule_{n}_tiny" in FLAVORS for n in SCHEDULE_NAMES)
