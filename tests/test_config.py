"""The Hydra tree composes for every option of every group and validates into the typed RunConfig; bad values
fail early with a ValueError naming the field (no training here, except one launch of the entry point)."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from test_train_support import CONF, child_env, compose, launch_cmd

from tpblocks.config import (
    ModelChoice,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    SchedulerConfig,
    TrainConfig,
    TrainerConfig,
)
from tpblocks.models import total_parameters
from tpblocks.parallel.mgrit.config import MGRITConfig

GROUPS = ("model", "data", "optim", "scheduler", "trainer", "experiment")
# Values the YAML leaves required (???): a local path and a tokenizer file. Composition only, nothing is read.
# Data groups bring their own context (2048 for FineWeb): a batch that divides both 256 and 2048.
GROUP_EXTRA = {"data": ["train.micro_batch=1", "train.tokens_per_step=16384"]}
REQUIRED = {"data.path": "/nonexistent/corpus.parquet", "data.tokenizer_path": "/nonexistent/tokenizer.model"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _validate(overrides: list[str]) -> RunConfig:
    cfg = compose(["run_dir=/tmp/unused", *overrides])
    for key, value in REQUIRED.items():  # fill only what is still missing after composition
        section, field = key.split(".")
        if cfg[section].get(field, None) is None or str(cfg[section][field]) == "???":
            cfg[section][field] = value
    return RunConfig.from_dictconfig(cfg)


IDENTITY = {"model": "flavor", "data": "source", "optim": "name", "scheduler": "name", "trainer": "backend"}


def _restated(values: dict, defaults: dict, where: str) -> list[str]:
    """``where.key`` for every value of a YAML block that equals its dataclass default (nested blocks too)."""
    found = []
    for key, value in values.items():
        if key not in defaults:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            found += _restated(value, defaults[key], f"{where}.{key}")
        elif value == defaults[key]:
            found.append(f"{where}.{key}={value!r}")
    return found


def test_yaml_sets_only_what_differs_from_the_dataclass_defaults():
    """The dataclasses hold the defaults (tpblocks_defaults); a group file or config.yaml restating one is a second
    copy that drifts (they once disagreed on max_steps 200 vs 100). Experiments pin values on purpose: not checked."""
    import yaml

    from tpblocks.config import hydra_defaults

    defaults = hydra_defaults()
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    restated = _restated({k: v for k, v in top.items() if k != "defaults"}, defaults, "config.yaml")
    for group, identity in IDENTITY.items():
        for option in _options(group):
            values = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
            values.pop(identity, None)  # the option says which one it is, even when that is the default
            restated += _restated(values, defaults[group], f"{group}/{option}.yaml")
    assert not restated, f"these repeat a dataclass default; delete them from the YAML: {restated}"
    run = _validate([])  # sections no YAML sets are exactly their dataclass defaults
    assert (run.train, run.parallel, run.layer_parallel) == (TrainConfig(), ParallelConfig(), MGRITConfig())


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group):
    options = _options(group)
    assert options, f"conf/{group}/ is empty"
    for option in options:
        prefix = "+" if group == "experiment" else ""
        run = _validate([f"{prefix}{group}={option}", *GROUP_EXTRA.get(group, [])])
        assert isinstance(run, RunConfig)
        if group == "model":
            assert run.flavor == compose(["run_dir=/x", f"model={option}"]).model.flavor


def test_default_is_the_quickstart():
    run = _validate([])
    assert run.name == "quickstart" and run.flavor == "debug_burger"
    assert run.data.source == "embedded"  # the README command needs no network and no ../shared
    assert run.model.vocab_size == run.data.vocab_size and run.model.max_seq_len == run.seq_len
    assert run.optim.lr == pytest.approx(3e-4) and run.optim.weight_decay == pytest.approx(0.1)
    assert run.scheduler.name == "cosine" and run.scheduler.warmup_fraction == pytest.approx(0.1)


def test_table6_experiments_are_parameter_matched():
    """burger_8lane / sandwich_8lane / llama_baseline: same 150M budget (within 1%), Table 6 protocol."""
    runs = {name: _validate([f"+experiment={name}"]) for name in ("llama_baseline", "burger_8lane", "sandwich_8lane")}
    counts = {name: total_parameters(run.model) for name, run in runs.items()}
    for name, run in runs.items():
        assert abs(counts[name] - 150e6) / 150e6 < 0.01, counts
        assert run.model.vocab_size == 32001 and run.model.tie_embeddings
        assert run.seq_len == 2048 and run.model.max_seq_len >= 2048
        assert run.train.tokens_per_step == 2**20 and run.train.max_steps == 1000
        assert run.train.precision == "bf16"
        assert run.optim.lr == pytest.approx(3e-4) and run.optim.weight_decay == pytest.approx(0.1)
        assert run.scheduler.name == "cosine" and run.scheduler.warmup_fraction == pytest.approx(0.1)
        assert run.data.source == "hub" and run.data.heldout_tokens == 400_000
    assert runs["burger_8lane"].model.recipe == "burger" and runs["burger_8lane"].model.lane_count == 8
    assert runs["sandwich_8lane"].model.recipe == "sandwich" and runs["sandwich_8lane"].model.lane_count == 8
    assert runs["llama_baseline"].model.arch == "llama"
    # Equal depth, so the comparison is about lanes, not about layers (12 lane layers + 1 classic = 13).
    assert {run.model.n_decoder_layers for run in runs.values()} == {13}


def test_smoke_fits_two_ranks_and_one():
    run = _validate(["+experiment=smoke"])
    assert run.train.grad_accumulation(run.seq_len, 2) * 2 == run.train.grad_accumulation(run.seq_len, 1)
    assert run.model.vocab_size == run.data.vocab_size


def test_command_line_beats_experiment():
    run = _validate(["+experiment=smoke", "train.max_steps=7", "scheduler=wsd"])
    assert run.train.max_steps == 7 and run.scheduler.name == "wsd"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.beta2=1.5", "optim.beta2"),
        ("scheduler.name=linear", "scheduler.name"),
        ("scheduler.warmup_fraction=1.5", "scheduler.warmup_fraction"),
        ("trainer.backend=zero3", "trainer.backend"),
        ("trainer.zero_stage=3", "trainer.zero_stage"),
        ("train.tokens_per_step=1000", "train.tokens_per_step"),
        ("train.precision=fp16", "train.precision"),
        ("train.max_steps=0", "train.max_steps"),
        ("wandb.mode=cloud", "wandb.mode"),
        ("model.flavor=gpt5", "model.flavor"),
        ("+model.overrides.lane_count=3", "lane_count"),
        ("+model.overrides.no_such_field=1", "model.overrides"),
        ("model.overrides.max_seq_len=64", "data.seq_len"),
        ("data.source=ftp", "data.source"),
        ("+train.no_such_key=1", "train"),
        ("parallel.lane=0", "parallel.lane"),
        ("parallel.lane=3", "parallel.lane=3: lane_count=4"),  # debug_burger has 4 lanes
        ("+parallel.dp=2", "parallel"),
        ("layer_parallel.cf=1", "layer_parallel.cf"),
        ("layer_parallel.relax=G", "layer_parallel.relax"),
        ("+layer_parallel.no_such_key=1", "layer_parallel"),
    ],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _validate([override])


def test_parallel_keys_default_off_and_compose():
    run = _validate([])
    assert run.parallel == ParallelConfig(lane=1) and run.layer_parallel.enabled is False
    yaml_keys = compose(["run_dir=/x"]).layer_parallel
    assert {k: run.layer_parallel.to_dict()[k] for k in yaml_keys} == dict(yaml_keys)  # every YAML key is typed
    lane = _validate(["parallel.lane=2"])
    assert lane.parallel.lane == 2 and lane.parallel.dims(4) == (2, 2)
    with pytest.raises(ValueError, match=r"parallel\.lane=2 does not divide the world size 3"):
        lane.parallel.dims(3)
    mgrit = _validate(["+experiment=mgrit_smoke"])
    assert mgrit.layer_parallel.enabled and mgrit.layer_parallel.cf == 2 and mgrit.model.arch == "llama"
    assert _validate(["layer_parallel.enabled=true", "layer_parallel.iters=3"]).layer_parallel.iters == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.lane=2", "trainer=deepspeed"], r"parallel\.lane=2 needs trainer=ddp or trainer=fsdp"),
        (["+experiment=mgrit_smoke", "trainer=deepspeed"], r"layer_parallel\.enabled=true needs trainer=ddp"),
        (["+experiment=mgrit_smoke", "trainer=fsdp"], r"layer_parallel\.enabled=true needs trainer=ddp \(not fsdp\)"),
        (["+experiment=mgrit_smoke", "parallel.lane=2"], r"cannot be combined with lane sharding"),
    ],
)
def test_parallel_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _validate(overrides)


def test_wsd_needs_a_stable_phase():
    with pytest.raises(ValueError, match="decay_fraction"):
        SchedulerConfig(name="wsd", warmup_fraction=0.5, decay_fraction=0.6)


def test_grad_accumulation_rule():
    train = TrainConfig(tokens_per_step=2**20, micro_batch=8)
    assert train.grad_accumulation(2048, 8) == 8  # 2^20 / (8 x 2048 x 8)
    assert train.grad_accumulation(2048, 64) == 1
    with pytest.raises(ValueError, match=r"tokens_per_step=1048576 is not a multiple .* world size \(3\)"):
        train.grad_accumulation(2048, 3)
    with pytest.raises(ValueError, match="micro_batch"):
        TrainConfig(micro_batch=0)


def test_dataclasses_are_frozen_and_keyword_only():
    for cls in (OptimConfig, SchedulerConfig, TrainConfig, TrainerConfig, ModelChoice, ParallelConfig):
        obj = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.__setattr__(dataclasses.fields(cls)[0].name, None)
        with pytest.raises(TypeError):
            cls(1)


def test_entry_point_reports_a_bad_config_without_a_traceback(tmp_path):
    proc = subprocess.run(
        launch_cmd([f"run_dir={tmp_path / 'run'}", "train.tokens_per_step=1000", "wandb.mode=disabled"]),
        cwd=CONF.parent, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.tokens_per_step=1000" in proc.stderr
    assert "Traceback" not in proc.stderr
