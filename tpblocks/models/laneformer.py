"""Kog's Laneformer checkpoint format (``config.json`` + safetensors, sharded index too) <-> ``arch="dtp"``.

    model = load_laneformer("path/to/laneformer-2b-it")         # what Hugging Face ``kogai/laneformer-2b-it`` holds
    save_laneformer(model, "out/", max_shard_bytes=2 << 30)      # the same format back (round trip exact)

The weights cannot be downloaded here; this follows the format as the public material describes it (issue 17)
and is tested on checkpoints tpblocks writes itself. Keys, all under ``model.``:

  tok_embeddings.weight (V, h)                    norm.weight (h) [(L, h) with per-lane norms]
  layers.{i}.attention.{wq,wk,wv}.weight (L, out/L, h)   layers.{i}.attention.wo.weight (L, h, in/L)
  layers.{i}.feed_forward.{w1,w3}.weight (L, F/L, h)     layers.{i}.feed_forward.w2.weight (L, h, F/L)
  layers.{i}.{attention_norm,ffn_norm}.weight (h) [(L, h)]
  lm_head.weight (V, h)  [lm_head.linear.weight (V, L h) for the ``lane`` head; absent when tied]

Linear weights are (out, in) per lane; tpblocks stacks them (in, out) for its batched matmuls, so conversion is
a transpose of the last two axes. Laneformer's RoPE is the interleaved (complex-pair) form: a tpblocks model
trained with rotate-half RoPE is exported with its q/k rows permuted per head (same function, interleaved).
Some releases keep ``lm_head`` outside the ``model.`` prefix (the Hugging Face habit): both are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ModelConfig
from .layers import RotaryEmbedding
from .model import TransformerLM

MODEL_TYPE = "laneformer"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# Laneformer config.json field -> ModelConfig field (same meaning); the DTP fields keep their names.
_CONFIG_FIELDS = {
    "num_lanes": "lane_count",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size",
    "rope_theta": "rope_theta",
    "norm_eps": "norm_eps",
    "max_position_embeddings": "max_seq_len",
    "tie_word_embeddings": "tie_embeddings",
    **{
        name: name
        for name in (
            "broadcast_delay",
            "use_comm",
            "use_early_comm",
            "lm_head_type",
            "pre_norm_lane_agg",
            "replicated_rmsn_scale",
            "sliding_window",
            "sliding_window_n_layers",
        )
    },  # fmt: skip
}
_DEFAULTS = {"tie_word_embeddings": False}  # Laneformer's, where tpblocks' own default differs
_IGNORED = {"model_type", "architectures", "torch_dtype", "transformers_version", "auto_map", "bos_token_id",
            "eos_token_id", "pad_token_id", "use_cache", "early_comm_resend"}  # fmt: skip

# tpblocks lane-layer parameter -> Laneformer key under layers.{i}. The lane-stacked matrices (3-D) are stored
# (in, out) per lane here and (out, in) there: a transpose of the last two axes; the norms are copied as they are.
_LAYER_KEYS = {
    "wq": "attention.wq.weight",
    "wk": "attention.wk.weight",
    "wv": "attention.wv.weight",
    "wo": "attention.wo.weight",
    "w_gate": "feed_forward.w1.weight",
    "w_up": "feed_forward.w3.weight",
    "w_down": "feed_forward.w2.weight",
    "attn_norm": "attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
}


# ---------------------------------------------------------------------------------------------- config
def config_from_laneformer(fields: dict, **overrides) -> ModelConfig:
    """A ``ModelConfig`` (arch="dtp", interleaved RoPE) from a Laneformer ``config.json`` dict."""
    unknown = sorted(set(fields) - set(_CONFIG_FIELDS) - _IGNORED)
    if unknown:
        raise ValueError(f"config.json has fields this Laneformer loader does not know: {unknown}")
    missing = sorted(k for k in ("num_lanes", "hidden_size", "num_hidden_layers", "vocab_size") if k not in fields)
    if missing:
        raise ValueError(f"config.json lacks {missing}: not a Laneformer config")
    values = {**_DEFAULTS, **fields}
    kwargs = {ours: values[theirs] for theirs, ours in _CONFIG_FIELDS.items() if theirs in values}
    kwargs["early_comm_resend"] = fields.get("early_comm_resend", True)  # tpblocks' flag; the older code's default
    return ModelConfig(arch="dtp", rope_interleaved=True, **{**kwargs, **overrides})


def _require_dtp(cfg: ModelConfig) -> None:
    if cfg.arch != "dtp":
        raise ValueError(f"the Laneformer format holds arch='dtp' models, got arch={cfg.arch!r}")


def laneformer_config(cfg: ModelConfig) -> dict:
    """The Laneformer ``config.json`` dict of a DTP config."""
    _require_dtp(cfg)
    fields = {theirs: getattr(cfg, ours) for theirs, ours in _CONFIG_FIELDS.items()}
    fields["intermediate_size"] = cfg.ffn_hidden
    return {"model_type": MODEL_TYPE, **fields, "early_comm_resend": cfg.early_comm_resend}


# ---------------------------------------------------------------------------------------------- weights
def _rotate_half_rows_to_interleaved(w_lof: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(L, out, in) q/k rows of rotate-half heads reordered so interleaved RoPE computes the same rotation."""
    lanes, out, d = w_lof.shape
    return w_lof.view(lanes, out // head_dim, 2, head_dim // 2, d).transpose(2, 3).reshape(lanes, out, d)


def _head_key(cfg: ModelConfig) -> str:
    return "lm_head.linear.weight" if cfg.lm_head_type == "lane" else "lm_head.weight"


def _params_by_key(model: TransformerLM) -> dict[str, tuple[torch.Tensor, str]]:
    """Laneformer key -> (the model's parameter, its lane-layer name or "") for every tensor the format holds."""
    cfg = model.cfg
    out = {"model.tok_embeddings.weight": (model.tok_embeddings.weight, ""),
           "model.norm.weight": (model.norm.weight, "")}  # fmt: skip
    for i, layer in enumerate(model.stages[0].layers):
        for ours, theirs in _LAYER_KEYS.items():
            out[f"model.layers.{i}.{theirs}"] = (getattr(layer, ours), ours)
    if not cfg.tie_embeddings:
        out[f"model.{_head_key(cfg)}"] = (model.output.weight, "")
    return out


def _stored_layout(w: torch.Tensor) -> torch.Tensor:
    """A lane-stacked matrix (l, in, out) as Laneformer stores it, (l, out, in); anything else as it is."""
    return w.transpose(1, 2) if w.dim() == 3 else w


def to_laneformer_state_dict(model: TransformerLM) -> dict[str, torch.Tensor]:
    """The model's weights under Laneformer keys and layouts (a full, unsharded model)."""
    cfg = model.cfg
    _require_dtp(cfg)
    if getattr(model, "shard_spec", None):
        raise ValueError("export a full model: gather a sharded one first (tpblocks.parallel.unshard_state_dict)")
    out = {}
    for key, (param, ours) in _params_by_key(model).items():
        w = _stored_layout(param)
        if ours in ("wq", "wk") and not cfg.rope_interleaved:
            w = _rotate_half_rows_to_interleaved(w, cfg.head_dim)
        out[key] = w.detach().contiguous()
    return out


@torch.no_grad()
def load_laneformer_state_dict(model: TransformerLM, weights: dict[str, torch.Tensor]) -> TransformerLM:
    """Copy Laneformer-keyed ``weights`` into a DTP ``model`` built from the same config (interleaved RoPE)."""
    cfg = model.cfg
    if not cfg.rope_interleaved:
        raise ValueError("Laneformer weights use interleaved RoPE: build the model with rope_interleaved=true")
    weights = dict(weights)
    head = _head_key(cfg)
    if f"model.{head}" not in weights and head in weights:  # lm_head outside the model. prefix
        weights[f"model.{head}"] = weights.pop(head)
    targets = _params_by_key(model)
    missing, unexpected = sorted(set(targets) - set(weights)), sorted(set(weights) - set(targets))
    if missing or unexpected:
        raise ValueError(f"Laneformer weights do not match the config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all)")  # fmt: skip
    for key, (param, _) in targets.items():
        if weights[key].shape != _stored_layout(param).shape:
            raise ValueError(f"{key}: shape {tuple(weights[key].shape)} does not fit the config "
                             f"(want {tuple(_stored_layout(param).shape)})")  # fmt: skip
        param.copy_(_stored_layout(weights[key]))
    return model


# ---------------------------------------------------------------------------------------------- files
def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - safetensors ships with the hf extra
        raise ImportError("the Laneformer format needs safetensors: pip install 'tpblocks[hf]'") from err
    return st


def is_laneformer_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        fields = json.loads(config.read_text())
    except ValueError:
        return False
    return fields.get("model_type") == MODEL_TYPE or "num_lanes" in fields


def save_laneformer(model: TransformerLM, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """``config.json`` + ``model.safetensors``, or shards of at most ``max_shard_bytes`` + the index."""
    st = _safetensors()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = to_laneformer_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, w in weights.items():
        nbytes = w.numel() * w.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = w
        size += nbytes
    (out / "config.json").write_text(json.dumps(laneformer_config(model.cfg), indent=2) + "\n")
    if len(shards) == 1:
        st.save_file(shards[0], str(out / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(w.numel() * w.element_size() for w in weights.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def read_laneformer_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Laneformer directory: one ``model.safetensors`` or the shards its index names."""
    st = _safetensors()
    root = Path(directory)
    if (root / INDEX).is_file():
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (root / SINGLE).is_file():
        files, weight_map = [SINGLE], None
    else:
        raise FileNotFoundError(f"{root} has neither {SINGLE} nor {INDEX}")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / INDEX} names {name}, which is missing")
        weights.update(st.load_file(str(root / name)))
    if weight_map is not None and set(weight_map) != set(weights):
        raise ValueError(f"{root / INDEX} and its shards disagree on {sorted(set(weight_map) ^ set(weights))[:5]}")
    return weights


def _uninitialised_model(cfg: ModelConfig) -> TransformerLM:
    """The model with storage but no initialisation (every weight is about to be overwritten): built on the meta
    device, so a 2B model costs no random init; the derived RoPE tables are computed for real."""
    with torch.device("meta"):
        model = TransformerLM(cfg)
    model = model.to_empty(device="cpu")
    for rope in {id(m): m for m in model.modules() if isinstance(m, RotaryEmbedding)}.values():
        fresh = RotaryEmbedding(2 * rope.half, rope.max_seq_len, cfg.rope_theta, rope.interleaved)
        rope.cos, rope.sin_signed = fresh.cos, fresh.sin_signed
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def load_laneformer(directory: str | os.PathLike, dtype: torch.dtype | None = None, **overrides) -> TransformerLM:
    """A DTP ``TransformerLM`` from a Laneformer directory (weights cast to ``dtype`` when given)."""
    root = Path(directory)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in {root}")
    cfg = config_from_laneformer(json.loads(config.read_text()), **overrides)
    weights = read_laneformer_weights(root)
    model = load_laneformer_state_dict(_uninitialised_model(cfg), weights)
    return model.to(dtype) if dtype is not None else model
