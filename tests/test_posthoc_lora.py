"""LoRA recovery (peft) of a parallelised model: perplexity goes down, only adapters train, QLoRA fails clearly."""

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from tpblocks.models import TransformerLM  # noqa: E402
from tpblocks.posthoc.eval import perplexity  # noqa: E402
from tpblocks.posthoc.layer_pairs import LayerPairConfig, apply_layer_pairs  # noqa: E402
from tpblocks.posthoc.lora import (  # noqa: E402
    LoraConfig,
    add_lora,
    lora_parameters,
    qlora_unavailable_reason,
    recover_with_lora,
)
from tpblocks.posthoc.parallelise import TABLE1, parallelise  # noqa: E402
from tpblocks.posthoc.text import read_text, split_text  # noqa: E402
from tpblocks.posthoc.tiny import tiny_config, train_lm  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as tests/conftest.py's fixture


@pytest.fixture(scope="module")
def trained():
    """A 4-layer byte-level Llama briefly trained on WikiText-2 (train part), plus held-out ids."""
    path = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} is not present (it ships beside the repository, not inside it)")
    text = read_text(path)
    train, heldout = split_text(text, 0.1)
    train_ids = torch.tensor(list(train[:400_000].encode()), dtype=torch.long)
    eval_ids = torch.tensor(list(heldout[:3000].encode()), dtype=torch.long)
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(n_layers=4, hidden_size=64, max_seq_len=128))
    train_lm(model, train_ids, steps=120, lr=4e-3, seq_len=64, batch=8, progress=False)
    return model, train_ids, eval_ids


def _ppl(m, ids):
    return perplexity(m, ids, window=64, stride=32).ppl


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lora_lowers_perplexity_of_a_parallelised_model(trained):
    base, train_ids, eval_ids = trained
    par = parallelise(base, TABLE1[7], 0, 4)  # rate 2, layer level, iterative
    frozen = {k: v.clone() for k, v in par.state_dict().items()}
    before = _ppl(par, eval_ids)
    assert before > _ppl(base, eval_ids)  # parallelising really hurt the trained model
    losses = recover_with_lora(par, train_ids, LoraConfig(rank=8, steps=40, lr=5e-3, seq_len=64, batch=8),
                               progress=False)  # fmt: skip
    after = _ppl(par, eval_ids)
    assert after < before * 0.98, (before, after)
    assert losses[-1] < losses[0]
    # Only adapters moved: every original weight is bit-identical.
    for k, v in frozen.items():
        key = k.replace(".weight", ".base_layer.weight") if k.rsplit(".", 2)[-2] in LoraConfig().targets else k
        torch.testing.assert_close(par.state_dict()[key], v, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lora_on_layer_pairs(trained):
    base, train_ids, eval_ids = trained
    lp = apply_layer_pairs(base, LayerPairConfig(start=1, end=3))
    before = _ppl(lp, eval_ids)
    recover_with_lora(lp, train_ids, LoraConfig(rank=4, steps=30, lr=5e-3, seq_len=64, batch=8), progress=False)
    assert _ppl(lp, eval_ids) < before


def test_adapters_target_tpblocks_linears_only():
    m = TransformerLM(tiny_config(n_layers=2, hidden_size=32, max_seq_len=32))
    n_before = sum(p.numel() for p in m.parameters())
    add_lora(m, LoraConfig(rank=2, targets=("wq", "w_down")))
    names = [n for n, _ in m.named_parameters() if "lora_" in n]
    assert names and all((".wq." in n) or (".w_down." in n) for n in names)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(m)}
    # rank-2 A (2 x in) and B (out x 2) per adapted linear
    hid, ffn = 32, m.cfg.ffn_hidden
    assert sum(p.numel() for p in trainable) == 2 * (2 * hid + 2 * hid + 2 * ffn + 2 * hid)
    assert sum(p.numel() for p in m.parameters()) == n_before + sum(p.numel() for p in trainable)
    # Fresh adapters start as the identity (B = 0): the function is unchanged.
    x = torch.randint(0, 256, (1, 8))
    ref = TransformerLM(m.cfg)
    ref.load_state_dict({k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if "lora_" not in k})
    torch.testing.assert_close(m(x), ref(x), rtol=1e-6, atol=1e-6)


def test_lora_config_validation_and_qlora_message():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    reason = qlora_unavailable_reason()
    if reason is None:
        pytest.skip("CUDA and bitsandbytes present: QLoRA is available here")
    m = copy.deepcopy(TransformerLM(tiny_config(n_layers=1, hidden_size=32, max_seq_len=32)))
    with pytest.raises(RuntimeError, match="QLoRA needs"):
        add_lora(m, LoraConfig(qlora=True))
