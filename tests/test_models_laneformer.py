"""The Laneformer checkpoint format (config.json + safetensors, sharded index) <-> arch="dtp", on files written here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tpblocks.models.config import ModelConfig
from tpblocks.models.flavors import get_flavor
from tpblocks.models.io import load_model
from tpblocks.models.laneformer import (
    INDEX,
    config_from_laneformer,
    laneformer_config,
    load_laneformer,
    save_laneformer,
)
from tpblocks.models.model import build_model

HEADS = {
    "replicate, shared norms": {},
    "lane head, per-lane norms": {"lm_head_type": "lane", "replicated_rmsn_scale": False},
    "vocab-parallel head, no early comm": {"lm_head_type": "vocab_parallel", "use_early_comm": False},
    "tied replicate head, pre-norm aggregation": {"tie_embeddings": True, "pre_norm_lane_agg": True},
}


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(get_flavor("debug_dtp", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("label", list(HEADS))
def test_round_trip_is_exact(tmp_path, label):
    model = _model(**HEADS[label])
    save_laneformer(model, tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    assert fields["model_type"] == "laneformer" and fields["num_lanes"] == 2 and fields["broadcast_delay"] == 1
    loaded = load_laneformer(tmp_path)
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(loaded(_tokens(model.cfg)), model(_tokens(model.cfg)))
    save_laneformer(loaded, tmp_path / "again")  # and back: the same bytes per tensor
    first, second = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "again/model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_keys_and_layouts_are_laneformer_s(tmp_path):
    model = _model()
    cfg = model.cfg
    save_laneformer(model, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    L, h, e, F = cfg.lane_count, cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden
    assert weights["model.tok_embeddings.weight"].shape == (cfg.vocab_size, h)
    assert weights["model.layers.0.attention.wq.weight"].shape == (L, cfg.n_heads * e // L, h)
    assert weights["model.layers.0.attention.wk.weight"].shape == (L, cfg.n_kv_heads * e // L, h)
    assert weights["model.layers.0.attention.wo.weight"].shape == (L, h, cfg.n_heads * e // L)
    assert weights["model.layers.3.feed_forward.w1.weight"].shape == (L, F // L, h)
    assert weights["model.layers.3.feed_forward.w2.weight"].shape == (L, h, F // L)
    assert weights["model.layers.1.attention_norm.weight"].shape == (h,)
    assert weights["model.lm_head.weight"].shape == (cfg.vocab_size, h)
    # lane 1's query heads are rows [n/L e, 2 n/L e) of the dense query projection: its own (out, in) block
    torch.testing.assert_close(weights["model.layers.0.attention.wq.weight"][1], model.stages[0].layers[0].wq[1].T)


def test_sharded_index_and_lm_head_outside_the_prefix(tmp_path):
    model = _model(lm_head_type="lane", replicated_rmsn_scale=False)
    save_laneformer(model, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["weight_map"]["model.lm_head.linear.weight"] in shards
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    loaded = load_laneformer(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(_tokens(model.cfg)), model(_tokens(model.cfg)))
    # Hugging Face habit: lm_head.* without the model. prefix, in its own shard
    moved = tmp_path / "unprefixed"
    moved.mkdir()
    (moved / "config.json").write_text((tmp_path / "config.json").read_text())
    weights = {k: v for name in shards for k, v in load_file(str(tmp_path / name)).items()}
    head = weights.pop("model.lm_head.linear.weight")
    save_file(weights, str(moved / "model-00001-of-00002.safetensors"))
    save_file({"lm_head.linear.weight": head}, str(moved / "model-00002-of-00002.safetensors"))
    weight_map = {**dict.fromkeys(weights, "model-00001-of-00002.safetensors"),
                  "lm_head.linear.weight": "model-00002-of-00002.safetensors"}  # fmt: skip
    (moved / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with torch.no_grad():
        assert torch.equal(load_model(moved)(_tokens(model.cfg)), model(_tokens(model.cfg)))


def test_rotate_half_model_exports_as_the_same_function(tmp_path):
    """A DTP model trained with tpblocks' default RoPE layout is exported with q/k rows permuted per head."""
    model = _model(rope_interleaved=False)
    save_laneformer(model, tmp_path)
    loaded = load_laneformer(tmp_path)
    assert loaded.cfg.rope_interleaved and loaded.cfg == model.cfg.replace(rope_interleaved=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_tokens(model.cfg)), model(_tokens(model.cfg)), rtol=1e-5, atol=1e-5)


def test_release_config_json_builds_the_release_model():
    fields = {
        "model_type": "laneformer", "num_lanes": 8, "broadcast_delay": 2, "use_comm": True, "use_early_comm": True,
        "lm_head_type": "replicate", "pre_norm_lane_agg": False, "replicated_rmsn_scale": True,
        "sliding_window": 512, "sliding_window_n_layers": 10, "hidden_size": 3072, "num_hidden_layers": 15,
        "num_attention_heads": 32, "num_key_value_heads": 16, "intermediate_size": 12288, "vocab_size": 32000,
        "rope_theta": 10000.0, "norm_eps": 1e-5, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
    }  # fmt: skip
    cfg = config_from_laneformer(fields)
    assert cfg == get_flavor("laneformer_2b")
    assert not cfg.tie_embeddings  # Laneformer's default
    assert {k: v for k, v in laneformer_config(cfg).items() if k in fields} == {
        k: v for k, v in fields.items() if k != "torch_dtype"
    }


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: (d / "config.json").write_text(json.dumps({"num_lanes": 2, "hidden_size": 64, "foo": 1})),
         "does not know: \\['foo'\\]"),
        (lambda d: (d / "model.safetensors").unlink(), "neither model.safetensors"),
        (lambda d: save_file({"model.norm.weight": torch.ones(64)}, str(d / "model.safetensors")), "missing"),
        (lambda d: save_file({**load_file(str(d / "model.safetensors")), "model.norm.weight": torch.ones(65)},
                             str(d / "model.safetensors")), "model.norm.weight: shape \\(65,\\)"),
    ],
)  # fmt: skip
def test_bad_laneformer_directories_say_what_is_wrong(tmp_path, damage, needle):
    save_laneformer(_model(), tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        load_laneformer(tmp_path)


def test_only_dtp_models_export():
    with pytest.raises(ValueError, match="arch='dtp'"):
        save_laneformer(build_model(get_flavor("debug_llama")), "unused")
