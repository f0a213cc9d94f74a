"""Loading Llama-family Hugging Face checkpoints (Llama, Mistral-style) from local directories, and saving back."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tpblocks.posthoc import TABLE1, parallelise  # noqa: E402
from tpblocks.posthoc.checkpoint import check_llama_family, load_llama_family, save_llama  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip


def _tokens():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))


def _save(hf_model, path):
    hf_model.save_pretrained(path)
    return path


def test_random_hf_llama_loads_with_identical_logits_and_saves_back(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    model = load_llama_family(_save(hf, tmp_path / "llama"))
    x = _tokens()
    with torch.no_grad():
        ref = hf(x).logits
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    save_llama(model, tmp_path / "back")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_mistral_without_sliding_window_loads(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**TINY, sliding_window=None)
    hf = transformers.MistralForCausalLM(cfg).eval()
    model = load_llama_family(_save(hf, tmp_path / "mistral"))
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_mistral_with_short_sliding_window_is_refused(tmp_path):
    cfg = transformers.MistralConfig(**TINY, sliding_window=16)
    _save(transformers.MistralForCausalLM(cfg), tmp_path / "m")
    with pytest.raises(ValueError, match="sliding_window=16"):
        load_llama_family(tmp_path / "m")


def test_window_as_long_as_the_context_is_accepted():
    check_llama_family({"model_type": "mistral", "sliding_window": 64, "max_position_embeddings": 64})


def test_non_llama_and_bad_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not Llama-family"):
        check_llama_family({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="head_dim"):
        check_llama_family({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama_family(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_llama_family(tmp_path)


def test_parallelised_model_cannot_be_saved_as_llama(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model = parallelise(load_llama_family(_save(hf, tmp_path / "l")), TABLE1[1], 0, 4)
    with pytest.raises(ValueError, match="parallelised post hoc"):
        save_llama(model, tmp_path / "out")
