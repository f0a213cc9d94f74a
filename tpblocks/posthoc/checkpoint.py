"""Loading Llama-family Hugging Face checkpoints (Llama, Mistral-style) into tpblocks, and saving them back.

Conversion itself is ``tpblocks.models.hf`` (a renaming of Llama weights). This module adds what a post-hoc
user meets first: reading ``config.json`` to decide whether the checkpoint is one tpblocks' Llama can run,
and a clear message when it is not. Mistral is Llama plus sliding-window attention; tpblocks' attention is
full causal, so a Mistral checkpoint is accepted only when its window never bites (``sliding_window`` is None
or at least ``max_position_embeddings``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tpblocks.models.hf import from_hf, save_hf
from tpblocks.models.model import TransformerLM

SUPPORTED = ("llama", "mistral")


def check_llama_family(hf_config: dict) -> None:
    """Raise ``ValueError`` (with the fix) unless the config describes a model tpblocks' Llama reproduces."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model_type={model_type!r} is not Llama-family; tpblocks loads {SUPPORTED} checkpoints "
            f"(convert other architectures yourself or pick a Llama/Mistral model)"
        )
    if model_type == "mistral":
        window = hf_config.get("sliding_window")
        max_pos = hf_config.get("max_position_embeddings", 0)
        if window is not None and window < max_pos:
            raise ValueError(
                f"this Mistral checkpoint uses sliding_window={window} < max_position_embeddings={max_pos}; "
                f"tpblocks' attention is full causal, so outputs would differ beyond {window} tokens. Set "
                f"sliding_window to null in config.json (exact for sequences <= {window}) or use Mistral v0.2+"
            )
    hidden, heads = hf_config.get("hidden_size"), hf_config.get("num_attention_heads")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and hidden and heads and head_dim != hidden // heads:
        raise ValueError(
            f"head_dim={head_dim} differs from hidden_size/num_attention_heads={hidden // heads}; "
            f"tpblocks' Llama derives the head size from the hidden size and cannot load this checkpoint"
        )
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError(
            "checkpoints with attention_bias/mlp_bias are not Llama-style; tpblocks' layers have no biases"
        )


def load_llama_family(directory: str | os.PathLike, **overrides) -> TransformerLM:
    """A ``TransformerLM`` (fp32, eval mode) from a local ``LlamaForCausalLM``/``MistralForCausalLM`` directory."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass a directory written by save_pretrained()")
    hf_cfg = json.loads(cfg_path.read_text())
    check_llama_family(hf_cfg)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return from_hf(hf_model, **overrides).eval()


def save_llama(model: TransformerLM, directory: str | os.PathLike) -> None:
    """Save an (unparallelised) tpblocks Llama back as a ``LlamaForCausalLM`` directory."""
    if getattr(model, "posthoc", None):
        raise ValueError(
            "this model was parallelised post hoc; its stages are no longer a plain Llama stack and cannot be "
            "saved as a LlamaForCausalLM. Save the original model, and the parallel configuration beside it"
        )
    save_hf(model, str(directory))


__all__ = ["SUPPORTED", "check_llama_family", "load_llama_family", "save_llama"]
