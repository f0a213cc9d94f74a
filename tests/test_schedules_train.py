"""Schedules through the trainer: every +experiment=schedule_* composes at matched parameters and tokens, a tiny
run of one trains end to end, and the quality-speed frontier joins losses with decode latencies correctly."""

import json
import sys
from pathlib import Path

import pytest
from test_train_support import compose

from tpblocks.config import RunConfig
from tpblocks.models.schedule_flavors import SCHEDULE_NAMES
from tpblocks.models.sizing import total_parameters
from tpblocks.sweeps.frontier import frontier_figure, frontier_points, row_schedule

REPO = Path(__file__).resolve().parents[1]


def test_every_schedule_experiment_composes_at_matched_parameters_and_tokens():
    runs = {name: RunConfig.from_dictconfig(compose(["run_dir=/tmp/unused", f"+experiment=schedule_{name}"]))
            for name in SCHEDULE_NAMES}  # fmt: skip
    budget = runs["llama"].model_choice.budget
    for name, run in runs.items():
        assert run.model.extra["schedule"] == name
        assert abs(total_parameters(run.model) - budget) <= 0.01 * budget, name
        assert run.model.vocab_size == runs["llama"].model.vocab_size  # the data's tokenizer, for all
        assert run.model.n_decoder_layers == runs["llama"].model.n_decoder_layers
        assert (run.train.max_steps, run.train.tokens_per_step, run.seed) == (
            runs["llama"].train.max_steps, runs["llama"].train.tokens_per_step, runs["llama"].seed)  # fmt: skip
    assert len({r.model.arch + r.model.recipe for r in runs.values()}) == len(SCHEDULE_NAMES)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kraken_trains_through_the_trainer(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks.schedules_train import table_rows, train_schedule

    summary = train_schedule("kraken", tmp_path / "k", ["wandb.mode=disabled", "train.max_steps=3",
                                                        "train.eval_every=3", "train.eval_tokens=2048"])  # fmt: skip
    assert summary["status"] == "completed" and summary["arch"] == "kraken"
    rows, figures = table_rows({"kraken": tmp_path / "k"})
    assert figures["kraken"]["final_eval_loss"] == pytest.approx(summary["final_eval_loss"])
    assert rows[0]["syncs/tok b+o"] == "1+3"  # 4 layers: one gather, three overlapped lane sums
    assert row_schedule({"run_dir": str(tmp_path / "k")}) == "kraken"  # read back from model_config.json


def _decode_json(path: Path, latencies: dict[str, float]) -> Path:
    results = {}
    for name, ms in latencies.items():
        results[name] = {"schedule": name, "communicate": True, "measured_s": ms / 1e3, "predicted_s": ms / 1e3,
                         "params": 5e7}  # fmt: skip
        results[f"{name} no-comm"] = {"schedule": name, "communicate": False, "measured_s": ms / 2e3, "params": 5e7}
    path.write_text(json.dumps({"benchmark": "decode_schedules", "results": results}))
    return path


def test_frontier_pairs_each_schedule_and_marks_the_pareto_front(tmp_path):
    decode = _decode_json(tmp_path / "d.json", {"llama": 50.0, "palm": 30.0, "track": 20.0, "kraken": 25.0})
    rows = [
        {"schedule": "llama", "final_eval_loss": 3.0},
        {"schedule": "palm", "final_eval_loss": 3.2},
        {"schedule": "palm", "final_eval_loss": 3.1},  # a second seed: the best loss is kept
        {"schedule": "track", "final_eval_loss": 3.4},
        {"schedule": "kraken", "final_eval_loss": 3.5},  # slower and worse than track: off the front
        {"schedule": "ladder", "final_eval_loss": 2.9},  # no latency measured: no point
    ]
    points = frontier_points(rows, decode)
    assert [p["schedule"] for p in points] == ["track", "kraken", "palm", "llama"]  # by latency
    assert {p["schedule"]: p["on_frontier"] for p in points} == {"track": True, "kraken": False, "palm": True,
                                                                  "llama": True}  # fmt: skip
    assert points[2]["eval_loss"] == 3.1 and points[0]["ceiling_s"] == pytest.approx(0.01)
    assert frontier_figure(points, tmp_path / "f.png").stat().st_size > 0
    with pytest.raises(ValueError, match="decode_schedules"):
        frontier_points(rows, _write(tmp_path / "other.json", {"benchmark": "decode", "results": {}}))


def _write(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload))
    return path
