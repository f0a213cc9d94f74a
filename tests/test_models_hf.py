"""Parity of the Llama baseline with Hugging Face transformers (fp32, tiny config, CPU)."""

import pytest
import torch

from tpblocks.models import ModelConfig, build_model
from tpblocks.models.hf import from_hf, load_hf, save_hf, to_hf

transformers = pytest.importorskip("transformers")


def tiny(tied: bool) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=211, hidden_size=48, n_heads=6, n_kv_heads=2, ffn_hidden_size=100,
                       n_layers=3, max_seq_len=64, tie_embeddings=tied, rope_theta=500.0)  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_hf_llama(tied):
    model = build_model(tiny(tied)).eval()
    with torch.no_grad():  # non-trivial norm weights so a mis-mapped norm cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf = to_hf(model)
    tokens = torch.randint(0, 211, (2, 17))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_hf_round_trip_through_disk(tmp_path):
    model = build_model(tiny(True)).eval()
    save_hf(model, str(tmp_path))
    back = load_hf(str(tmp_path)).eval()
    tokens = torch.randint(0, 211, (1, 11))
    torch.testing.assert_close(back(tokens), model(tokens), rtol=0, atol=0)
    assert back.cfg.replace(extra={}) == model.cfg.replace(extra={})


def test_random_hf_model_converts_in():
    hf_cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False)  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    model = from_hf(hf).eval()
    tokens = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_hf_conversion_refuses_lane_models():
    with pytest.raises(ValueError, match="arch='llama'"):
        to_hf(build_model(ModelConfig(arch="tp_blocks", lane_count=2, hidden_size=32, lane_n_heads=2,
                                      lane_n_kv_heads=1)))  # fmt: skip
