"""The train-step benchmark compares what it claims to: every lane model within 2 % of the baseline's
parameters, the "(6.7 rule)" rows at the lane aspect ratio the report's §6.7 rule picks. Timings are not
checked here (benchmarks are not tests)."""

import pytest

from benchmarks.train_step import BASELINE, LANE_ASPECT_6_7, configs, paired_ratio, report_scale_flops
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


def test_paired_ratio_is_the_median_of_per_round_ratios():
    times = {"base": [1.0, 2.0, 4.0, 1.0], "lane": [1.1, 2.2, 4.4, 9.0]}  # the last round of "lane" was disturbed
    assert paired_ratio(times, "lane", "base") == pytest.approx(1.1)
    with pytest.raises(ValueError):
        paired_ratio({"base": [1.0], "lane": [1.0, 2.0]}, "lane", "base")


def test_report_scale_llama_is_parameter_matched():
    for row in report_scale_flops():
        assert row["llama_params_B"] == pytest.approx(row["params_B"], rel=0.01), row["model"]
        # Lanes add attention work but the matmuls (6 x parameters) are shared, so the total ratio is milder.
        assert 1.0 < row["flop_ratio"] < row["attention_flop_ratio"]
