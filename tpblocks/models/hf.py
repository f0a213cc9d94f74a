"""Weight conversion between the Llama baseline and Hugging Face ``transformers`` ``LlamaForCausalLM``.

Both use rotate-half RoPE and (out, in) linear weights, so conversion is a renaming. ``transformers`` is
imported lazily (it is an optional extra: ``pip install tpblocks[hf]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .model import TransformerLM

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaConfig, LlamaForCausalLM

_LAYER_KEYS = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _require_llama(cfg: ModelConfig) -> None:
    if cfg.arch != "llama":
        raise ValueError(f"Hugging Face conversion covers arch='llama' only, got arch={cfg.arch!r}")


def hf_config(cfg: ModelConfig) -> LlamaConfig:
    from transformers import LlamaConfig

    _require_llama(cfg)
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )


def config_from_hf(hf_cfg: LlamaConfig, **overrides) -> ModelConfig:
    rope_theta = getattr(hf_cfg, "rope_theta", None)
    if rope_theta is None:  # newer transformers keep it in rope_parameters
        rope_theta = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    scaling = getattr(hf_cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {scaling} is not supported by tpblocks' Llama; use an unscaled checkpoint")
    fields = dict(
        arch="llama",
        vocab_size=hf_cfg.vocab_size,
        hidden_size=hf_cfg.hidden_size,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
        ffn_hidden_size=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        max_seq_len=hf_cfg.max_position_embeddings,
        rope_theta=float(rope_theta),
        norm_eps=hf_cfg.rms_norm_eps,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf_state_dict(model: TransformerLM) -> dict[str, torch.Tensor]:
    _require_llama(model.cfg)
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.stages):
        ours = layer.state_dict()
        for mine, theirs in _LAYER_KEYS.items():
            sd[f"model.layers.{i}.{theirs}"] = ours[mine]
    return {k: v.detach().clone() for k, v in sd.items()}


def from_hf_state_dict(model: TransformerLM, sd: dict[str, torch.Tensor]) -> TransformerLM:
    _require_llama(model.cfg)
    ours = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not model.cfg.tie_embeddings:
        ours["output.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(model.cfg.n_layers):
        for mine, theirs in _LAYER_KEYS.items():
            ours[f"stages.{i}.{mine}"] = sd[f"model.layers.{i}.{theirs}"]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing}, unexpected {unexpected}")
    return model


def to_hf(model: TransformerLM) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with this model's weights (fp32 unless the model is cast)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(model.cfg)).to(model.tok_embeddings.weight.dtype)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.cfg.tie_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"conversion to transformers left missing={missing} unexpected={unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def from_hf(hf_model: LlamaForCausalLM, **overrides) -> TransformerLM:
    model = TransformerLM(config_from_hf(hf_model.config, **overrides))
    return from_hf_state_dict(model, hf_model.state_dict())


def save_hf(model: TransformerLM, directory: str) -> None:
    to_hf(model).save_pretrained(directory)


def load_hf(directory: str, **overrides) -> TransformerLM:
    from transformers import LlamaForCausalLM

    return from_hf(LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32), **overrides)
