"""The train-step benchmark compares what it claims to: every lane model within 2 % of the baseline's
parameters, the "(6.7 rule)" rows at the lane aspect ratio the report's §6.7 rule picks. Timings are not
checked here (benchmarks are not tests)."""

import pytest

from benchmarks.train_step import BASELINE, LANE_ASPECT_6_7, configs
from tpblocks.models import solve_hidden_size, total_parameters


@pytest.mark.parametrize("quick", [True, False])
def test_lane_models_match_baseline_parameters(quick):
    cfgs = configs(quick)
    budget = total_parameters(cfgs[BASELINE])
    assert len(cfgs) == 5
    for name, cfg in cfgs.items():
        assert total_parameters(cfg) == pytest.approx(budget, rel=0.02), name
        assert cfg.max_seq_len == cfgs[BASELINE].max_seq_len


def test_rule_rows_take_the_depth_nearest_the_report_aspect():
    cfgs = configs(quick=True)
    budget = total_parameters(cfgs[BASELINE])
    for recipe, aspect in LANE_ASPECT_6_7.items():
        chosen = cfgs[f"{recipe}-8 (6.7 rule)"]
        gap = abs(chosen.lane_hidden_size / chosen.lane_depth - aspect)
        for depth in range(1, 9):
            other = solve_hidden_size(chosen.replace(lane_depth=depth), budget, tolerance=0.02)
            assert gap <= abs(other.lane_hidden_size / depth - aspect) + 1e-9
        assert cfgs[f"{recipe}-8 (depth 4)"].lane_depth == 4
