"""Post-hoc parallelisation of pre-trained Llama-family models (docs/posthoc.md).

- ``checkpoint``      load Llama / Mistral-style Hugging Face checkpoints, save back
- ``parallelise``     sub-layer / layer parallelism, iterative, averaged: the 16 configurations of Table 1
- ``layer_pairs``     Layer Parallelism: contiguous layer pairs on two ranks, one all-reduce per pair
- ``eval``            strided perplexity, measured KV-cache decode latency and syncs/token
- ``lm_eval_adapter`` ``TpblocksLM``: lm-evaluation-harness on any tpblocks model (imported lazily)
- ``lora``            LoRA (QLoRA where possible) recovery with ``peft``
- ``tiny``            a tiny byte-level Llama trained on local text, for CPU demonstrations
"""

from .checkpoint import check_llama_family, load_llama_family, save_llama
from .eval import measure_decode, perplexity
from .layer_pairs import LayerPairConfig, apply_layer_pairs, distribute_layer_pairs, expected_lp_syncs_per_token
from .parallelise import TABLE1, ParallelConfig, config_by_name, expected_syncs_per_token, parallelise
from .text import ByteTokenizer, load_tokenizer, read_text, split_text

__all__ = [
    "TABLE1",
    "ByteTokenizer",
    "LayerPairConfig",
    "ParallelConfig",
    "apply_layer_pairs",
    "check_llama_family",
    "config_by_name",
    "distribute_layer_pairs",
    "expected_lp_syncs_per_token",
    "expected_syncs_per_token",
    "load_llama_family",
    "load_tokenizer",
    "measure_decode",
    "parallelise",
    "perplexity",
    "read_text",
    "save_llama",
    "split_text",
]
