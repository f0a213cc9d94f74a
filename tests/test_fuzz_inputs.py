"""Hostile-but-fair inputs: every bad config value, data file, token shard, checkpoint file and `generate` argument
ends in one actionable ValueError line (exit 2 from the entry points), never a traceback or a silent wrong run.

Most cases stop at validation, in this process (the config loader, ``ModelConfig``, ``load_prepared``,
``generate.parse_args``); a handful go through the real entry points to check the exit code and the one line.
The checkpoint and trainer cases that need training runs are in test_train_faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_train_support import REPO, child_env, compose, tiny_data, tiny_overrides

from tpblocks.config import RunConfig
from tpblocks.data import DataConfig, DataError, load_prepared, prepare_data
from tpblocks.data.prepare import data_cache_key
from tpblocks.data.shards import HEADER_BYTES
from tpblocks.models import ModelConfig
from tpblocks.typed import check_fields

__all__ = ["tiny_data"]

sys.path.insert(0, str(REPO / "launch"))
import generate as generate_cli  # noqa: E402 - launch/ is not a package


def _config(*overrides: str) -> RunConfig:
    return RunConfig.from_dictconfig(compose(["run_dir=/tmp/unused", *overrides]))


# ------------------------------------------------------------------------------------------ config overrides
BAD_OVERRIDES = {
    # type errors: the field, the value, the expected type
    "train.max_steps=abc": r"^train.max_steps='abc' must be an integer$",
    "train.max_steps=null": r"^train.max_steps=null must be an integer$",
    "train.max_steps=1.5": r"^train.max_steps=1.5 must be an integer$",
    "train.micro_batch=two": r"^train.micro_batch='two' must be an integer$",
    "train.eval_every=1.5": r"^train.eval_every=1.5 must be an integer$",
    "train.tokens_per_step=64.5": r"^train.tokens_per_step=64.5 must be an integer$",
    "train.compile=maybe": r"^train.compile='maybe' must be true or false$",
    "train.progress=1": r"^train.progress=1 must be true or false$",
    "train.resume=null": r"^train.resume=null must be a string$",
    "optim.lr=fast": r"^optim.lr='fast' must be a finite number$",
    "optim.lr=.inf": r"^optim.lr=.* must be a finite number$",
    "optim.beta1=[0.9]": r"^optim.beta1=\[0.9\] must be a finite number$",
    "seed=abc": r"^seed='abc' must be an integer$",
    "seed=null": r"^seed=null must be an integer$",
    "data.seq_len=abc": r"^data.seq_len='abc' must be an integer$",
    "data.seq_len=32.5": r"^data.seq_len=32.5 must be an integer$",
    "data.shuffle=maybe": r"^data.shuffle='maybe' must be true or false$",
    "data.on_invalid=ignore": r"^data.on_invalid='ignore' must be one of 'skip', 'error'$",
    "data.source=s3": r"^data.source='s3' must be one of",
    "scheduler.warmup_fraction=lots": r"^scheduler.warmup_fraction='lots' must be a finite number$",
    "trainer.zero_stage=one": r"^trainer.zero_stage='one' must be an integer$",
    "trainer.dist_timeout_s=soon": r"^trainer.dist_timeout_s='soon' must be an integer$",
    "parallel.lane=2.5": r"^parallel.lane=2.5 must be an integer$",
    "layer_parallel.enabled=yes": r"^layer_parallel.enabled='yes' must be true or false$",
    "layer_parallel.iters=x": r"^layer_parallel.iters='x' must be an integer$",
    "wandb.tags=7": r"^wandb.tags=7 must be a list$",
    "model.budget=big": r"^model.budget='big' must be an integer or null$",
    # model overrides: types and sizes
    "+model.overrides.tie_embeddings=no": r"^model.overrides.tie_embeddings='no' must be true or false$",
    "+model.overrides.hidden_size=6.4": r"^model.overrides.hidden_size=6.4 must be an integer$",
    "+model.overrides.ffn_hidden_size=0": r"^model.overrides.ffn_hidden_size=0 must be a positive integer or null",
    "+model.overrides.lane_n_kv_heads=0": r"^model.overrides.lane_n_kv_heads=0 must be a positive integer or null",
    "+model.overrides.lane_n_heads=-2": r"^model.overrides.lane_n_heads=-2 must be a positive integer or null",
    "+model.overrides.lane_ffn_hidden_size=-5": r"^model.overrides.lane_ffn_hidden_size=-5 must be a positive",
    "+model.overrides.rope_theta=0": r"^model.overrides.rope_theta=0.0 must be > 0",
    "+model.overrides.rope_theta=-10": r"^model.overrides.rope_theta=-10.0 must be > 0",
    "+model.overrides.init_std=-1": r"^model.overrides.init_std=-1.0 must be >= 0$",
    "+model.overrides.recipe=salad": r"^model.overrides.recipe='salad' must be one of 'sandwich', 'burger', 'track'$",
    "+model.overrides.lane_count=0": r"^model.overrides.lane_count=0 must be >= 1$",
    "+model.overrides.hiden_size=64": r"^model.overrides has unknown key\(s\) \['hiden_size'\]",
    # unknown keys, nested and top-level
    "+lr=0.01": r"^the config has unknown key\(s\) \['lr'\]; .*optim.lr=0.01",
    "+optimizer.lr=0.01": r"^the config has unknown key\(s\) \['optimizer'\]",
    "+train.max_step=5": r"^train has unknown key\(s\) \['max_step'\]",
    "+layer_parallel.levles=3": r"^layer_parallel has unknown key\(s\) \['levles'\]",
}


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_bad_override_is_one_line_naming_the_field(override):
    with pytest.raises(ValueError, match=BAD_OVERRIDES[override]) as info:
        _config(override)
    assert "\n" not in str(info.value)


GOOD_OVERRIDES = {
    "train.tokens_per_step=4096.0": lambda r: r.train.tokens_per_step == 4096 and type(r.train.tokens_per_step) is int,
    "train.compile=true": lambda r: r.train.compile is True,
    "train.compile=False": lambda r: r.train.compile is False,
    "+model.overrides.tie_embeddings=false": lambda r: r.model.tie_embeddings is False,
    "model.budget=1e6": lambda r: r.model_choice.budget == 1_000_000,
    "optim.lr=1": lambda r: r.optim.lr == 1.0 and type(r.optim.lr) is float,
    "wandb.tags=[a,b]": lambda r: r.wandb.tags == ("a", "b"),
    "name=2024": lambda r: r.name == "2024",
    "+sweep.grid=lane_count": lambda r: True,  # read by launch/slurm/submit.py, not by the trainer
}


@pytest.mark.parametrize("override", sorted(GOOD_OVERRIDES))
def test_good_override_is_coerced_to_its_declared_type(override):
    assert GOOD_OVERRIDES[override](_config(override))


# --------------------------------------------------------------------------------------- Python API: ModelConfig
BAD_MODELS = {
    "hidden_size='64'x": ({"hidden_size": "64x"}, r"^hidden_size='64x' must be an integer$"),
    "n_layers=True": ({"n_layers": True}, r"^n_layers=True must be an integer$"),
    "tie_embeddings='no'": ({"tie_embeddings": "no"}, r"^tie_embeddings='no' must be true or false$"),
    "tie_embeddings=1": ({"tie_embeddings": 1}, r"^tie_embeddings=1 must be true or false$"),
    "rope_theta=0": ({"rope_theta": 0}, r"^rope_theta=0.0 must be > 0"),
    "rope_theta=nan": ({"rope_theta": float("nan")}, r"^rope_theta=nan must be a finite number$"),
    "init_std=-1": ({"init_std": -1}, r"^init_std=-1.0 must be >= 0$"),
    "ffn_hidden_size=0": ({"ffn_hidden_size": 0}, r"^ffn_hidden_size=0 must be a positive integer or null"),
    "lane_ffn_hidden_size=-5": ({"lane_ffn_hidden_size": -5}, r"^lane_ffn_hidden_size=-5 must be a positive"),
    "arch='gpt'": ({"arch": "gpt"}, r"^arch='gpt' must be one of 'llama', 'tp_blocks'"),
    "comm_reception='max'": ({"comm_reception": "max"}, r"^comm_reception='max' must be one of 'sum', 'mean'"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_model_config_checks_types_and_sizes_from_python(case):
    kwargs, pattern = BAD_MODELS[case]
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**kwargs)


def test_model_config_coerces_integral_floats_and_bool_words():
    cfg = ModelConfig(hidden_size=64.0, tie_embeddings="False", rope_theta=500000)
    assert cfg.hidden_size == 64 and type(cfg.hidden_size) is int
    assert cfg.tie_embeddings is False and cfg.rope_theta == 500000.0 and type(cfg.rope_theta) is float


def test_every_config_dataclass_checks_its_fields():
    """No config dataclass forgets ``check_fields``: each one's ``__post_init__`` calls it."""
    import dataclasses
    import inspect

    from tpblocks import config as run_config
    from tpblocks.parallel.mgrit import MGRITConfig

    classes = [ModelConfig, DataConfig, MGRITConfig, generate_cli.GenerateArgs]
    classes += [c for c in vars(run_config).values() if dataclasses.is_dataclass(c)]
    assert RunConfig in classes and len(classes) >= 12
    for cls in classes:
        assert "check_fields(self" in inspect.getsource(cls.__post_init__), f"{cls.__name__} does not check_fields"


def test_check_fields_names_section_and_field():
    with pytest.raises(ValueError, match=r"^optim.lr='x' must be a finite number$"):
        from tpblocks.config import OptimConfig

        OptimConfig(lr="x")
    with pytest.raises(TypeError):  # not a dataclass: a programming error, not a user one
        check_fields(object())


# ------------------------------------------------------------------------------------------- documents -> shards
def _local(tmp_path, name: str, content: bytes, **extra) -> DataConfig:
    path = tmp_path / name
    path.write_bytes(content)
    values = dict(source="local", path=str(path), cache_dir=str(tmp_path / "cache"), vocab_size=300, heldout_tokens=64)
    return DataConfig(**{**values, **extra})


PRETTY_ARRAY = b'[\n  {\n    "text": "hello"\n  },\n  {\n    "text": "world"\n  }\n]\n'
UNUSABLE_CORPORA = {
    "binary garbage .jsonl": ("g.jsonl", bytes(range(128, 256)) * 40, r"invalid UTF-8"),
    "pretty-printed JSON array": ("a.jsonl", PRETTY_ARRAY, r"a.jsonl:1: malformed JSON .*one JSON object per line"),
    ".txt with two bad bytes": ("t.txt", b"plain text \xff\xfe then more", r"t.txt: invalid UTF-8"),
    "only empty documents": ("e.jsonl", b'{"text": ""}\n{"text": "   "}\n', r"were empty"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE_CORPORA))
def test_a_corpus_that_yields_nothing_says_why(tmp_path, case):
    name, content, reason = UNUSABLE_CORPORA[case]
    with pytest.raises(DataError, match=rf"no text to train a tokenizer on.*; all \d+ documents read .*{reason}"):
        prepare_data(_local(tmp_path, name, content))


@pytest.fixture(scope="module")
def prepared(tiny_data, tmp_path_factory):
    """A small prepared directory (the trainer tests' corpus and tokenizer)."""
    cfg = RunConfig.from_dictconfig(compose(tiny_overrides(tiny_data, tmp_path_factory.mktemp("unused")))).data
    return prepare_data(cfg)


def test_one_document_longer_than_the_heldout_budget_is_split(prepared, tmp_path, caplog):
    text = json.dumps({"text": " ".join(f"word{i}" for i in range(3000))})
    cfg = _local(tmp_path, "one.jsonl", text.encode(), tokenizer_path=str(prepared.tokenizer_path), heldout_tokens=500)
    with caplog.at_level("WARNING", logger="tpblocks.data.prepare"):
        out = prepare_data(cfg)
    assert out.n_heldout_tokens == 500 and out.n_train_tokens > 1000
    assert "ends inside the last document read" in caplog.text


def test_a_json_file_holding_one_array_is_read(tmp_path):
    from tpblocks.data import iter_documents

    assert list(iter_documents(_local(tmp_path, "a.json", PRETTY_ARRAY))) == ["hello", "world"]


def test_on_invalid_is_part_of_the_cache_key(tmp_path):
    cfg = _local(tmp_path, "c.jsonl", b'{"text": "x"}\n')
    assert data_cache_key(cfg, "0" * 64) != data_cache_key(cfg.replace(on_invalid="error"), "0" * 64)


def _copy(prepared, tmp_path):
    target = tmp_path / "shards"
    shutil.copytree(prepared.directory, target)
    (target / ".verified.json").unlink(missing_ok=True)
    return target


def _poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _random_ids(path, vocab: int) -> None:
    n = (path.stat().st_size - HEADER_BYTES) // 2
    ids = np.random.default_rng(0).integers(0, vocab, size=n, dtype=np.uint16)
    _poke(path, HEADER_BYTES, ids.tobytes())


def _without_checksums(directory) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["checksums"]
    (directory / "manifest.json").write_text(json.dumps(manifest))


SHARD_DAMAGE = {
    "random in-vocabulary ids": (
        lambda d, v: _random_ids(d / "train_000000.bin", v),
        r"train_000000.bin does not "
        r"match its sha256",
    ),
    "zeroed body": (
        lambda d, v: _poke(d / "train_000000.bin", HEADER_BYTES, bytes(4096)),
        r"does not match its sha256",
    ),
    "zeroed held-out body": (lambda d, v: _poke(d / "heldout.bin", HEADER_BYTES, bytes(512)), r"heldout.bin does not"),
    "out-of-vocabulary id": (
        lambda d, v: _poke(d / "train_000000.bin", HEADER_BYTES + 10, b"\xff\xff"),
        r"does not match its sha256",
    ),
    "out-of-vocabulary id, no checksums": (
        lambda d, v: (_without_checksums(d), _poke(d / "train_000000.bin", HEADER_BYTES + 10, b"\xff\xff")),
        r"holds id 65535, outside the vocabulary of 384 tokens",
    ),
    "garbage manifest": (
        lambda d, v: (d / "manifest.json").write_bytes(b"\x00{garbage"),
        r"manifest.json is not "
        r"valid JSON",
    ),
    "manifest is a list": (lambda d, v: (d / "manifest.json").write_text("[1, 2]"), r"has format 'list'"),
    "incomplete manifest": (
        lambda d, v: (d / "manifest.json").write_text(json.dumps({"format": "tpblocks-tokens", "version": 1})),
        r"manifest.json lacks \['tokenizer_sha256', 'train_shards'",
    ),
    "missing manifest": (lambda d, v: (d / "manifest.json").unlink(), r"holds no manifest.json"),
    "truncated shard": (lambda d, v: os.truncate(d / "train_000000.bin", HEADER_BYTES + 11), r"the file is truncated"),
}


@pytest.mark.parametrize("case", sorted(SHARD_DAMAGE))
def test_damaged_prepared_directory_is_refused(prepared, tmp_path, case):
    directory = _copy(prepared, tmp_path)
    damage, pattern = SHARD_DAMAGE[case]
    damage(directory, prepared.vocab_size)
    with pytest.raises(ValueError, match=pattern) as info:  # DataError or ShardError, both ValueErrors
        prepare_data(DataConfig(source="shards", path=str(directory)))
    assert "\n" not in str(info.value)


def test_bodies_are_verified_once_then_again_after_a_change(prepared, tmp_path):
    directory = _copy(prepared, tmp_path)
    load_prepared(directory)
    assert (directory / ".verified.json").is_file()
    load_prepared(directory)  # unchanged: trusted from the marker
    _poke(directory / "train_000000.bin", HEADER_BYTES, bytes(64))  # changes the mtime: checked again
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_prepared(directory)


# --------------------------------------------------------------------------------------------------- generate
BAD_GENERATE = {
    "top_k=abc": r"^top_k='abc' must be an integer or null$",
    "top_k=2.5": r"^top_k=2.5 must be an integer or null$",
    "top_k=0": r"^top_k=0 must be >= 1",
    "temperature=.nan": r"^temperature=nan must be a finite number$",
    "temperature=hot": r"^temperature='hot' must be a finite number$",
    "temperature=-1": r"^temperature=-1.0 must be >= 0",
    "max_new_tokens=abc": r"^max_new_tokens='abc' must be an integer$",
    "max_new_tokens=2.7": r"^max_new_tokens=2.7 must be an integer$",
    "max_new_tokens=-3": r"^max_new_tokens=-3 must be >= 0$",
    "eos=maybe": r"^eos='maybe' must be true or false$",
    "seed=x": r"^seed='x' must be an integer$",
    "prompt_ids=[[1,2]]": r"^prompt_ids=\[\[1, 2\]\] must be a token id or a flat list",
    "prompt_ids=[1,abc]": r"^prompt_ids=\[1, 'abc'\] must be a token id or a flat list",
    "prompt_ids=[-1]": r"^prompt_ids=\[-1\] must be a token id or a flat list",
}


@pytest.mark.parametrize("arg", sorted(BAD_GENERATE))
def test_bad_generate_argument_is_one_line(arg):
    argv = ["checkpoint=/nowhere", *(() if arg.startswith("prompt_ids") else ("prompt_ids=[1]",)), arg]
    with pytest.raises(generate_cli.UsageError, match=BAD_GENERATE[arg]):
        generate_cli.parse_args(argv)


def test_good_generate_arguments_are_typed():
    args = generate_cli.parse_args(["checkpoint=x", "prompt_ids=[1,2]", "max_new_tokens=4.0", "eos=false", "top_k=5"])
    assert args["max_new_tokens"] == 4 and type(args["max_new_tokens"]) is int
    assert args["eos"] is False and args["top_k"] == 5 and args["temperature"] == 0.0


# ---------------------------------------------------------------------------------------- the real entry points
def _cli(script: str, *argv: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *argv], cwd=cwd, env=child_env(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv, line",
    [
        (["train.max_steps=abc"], "error: train.max_steps='abc' must be an integer"),
        (["+lr=0.01"], "error: the config has unknown key(s) ['lr']"),
        (["+model.overrides.rope_theta=0"], "error: model.overrides.rope_theta=0.0 must be > 0"),
    ],
)
def test_train_entry_point_exits_2_with_one_line(tmp_path, argv, line):
    done = _cli("train.py", f"run_dir={tmp_path / 'run'}", *argv)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(line), done.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_generate_entry_point_exits_2_on_a_damaged_checkpoint(tmp_path):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"PK\x03\x04 not really a zip")
    done = _cli("generate.py", f"checkpoint={fake}", "prompt_ids=[1]")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read {fake}"), done.stderr[-2000:]
