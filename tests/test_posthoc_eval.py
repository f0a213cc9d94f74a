"""Perplexity (strided windows), local text reading, decode measurement, and the lm-eval adapter."""

import math

import pytest
import torch
import torch.nn.functional as F

from tpblocks.models import TransformerLM, get_flavor
from tpblocks.posthoc.eval import _windows, measure_decode, perplexity
from tpblocks.posthoc.parallelise import TABLE1, parallelise
from tpblocks.posthoc.text import ByteTokenizer, load_tokenizer, read_text, split_text


def _model(n_layers=2, max_seq_len=64):
    torch.manual_seed(0)
    return TransformerLM(get_flavor("debug_llama", n_layers=n_layers, max_seq_len=max_seq_len)).eval()


def _ids(n, seed=2):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,window,stride", [(100, 16, 8), (100, 16, 16), (37, 10, 3), (5, 16, 4), (64, 64, 64)])
def test_windows_score_every_token_after_the_first_exactly_once(n, window, stride):
    scored, starts = [], []
    for begin, end, k in _windows(n, window, stride):
        assert end - begin <= window and k >= 1
        scored.extend(range(end - k, end))
        starts.append(begin)
    # With stride == window the windows do not overlap: a window's first token has no context and is never scored.
    unscorable = {b for b in starts if b > 0} if stride == window else set()
    assert sorted(scored) == sorted(set(range(1, n)) - unscorable)


@torch.no_grad()
def _reference_strided_nll(model, ids, window, stride):
    """The Hugging Face 'perplexity of fixed-length models' recipe, one window at a time with -100 labels."""
    nlls, n_tok, prev_end = [], 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        trg_len = end - prev_end
        inp = ids[begin:end].view(1, -1)
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        logits = model(inp)
        loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        nlls.append(loss.item())
        n_tok += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == ids.numel():
            break
    return sum(nlls) / n_tok, n_tok


@pytest.mark.parametrize("window,stride", [(32, 16), (32, 32), (20, 7)])
def test_perplexity_matches_the_reference_recipe(window, stride):
    m, ids = _model(), _ids(150)
    res = perplexity(m, ids, window=window, stride=stride, batch_size=3)
    nll, n = _reference_strided_nll(m, ids, window, stride)
    assert res.n_tokens == n == (149 if stride < window else 149 - 149 // window)
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_validates_arguments():
    m = _model()
    with pytest.raises(ValueError, match="stride"):
        perplexity(m, _ids(50), window=16, stride=20)
    with pytest.raises(ValueError, match="max_seq_len"):
        perplexity(m, _ids(200), window=128)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(m, _ids(1), window=16)


def test_wikitext_is_read_with_normalised_line_endings(shared_data):
    path = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    raw = path.read_bytes()
    assert b"\r\n" in raw  # the file really is CRLF, so the normalisation below is doing something
    text = read_text(path)
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n")
    assert text.count("\n") == raw.count(b"\r\n") + raw.replace(b"\r\n", b"").count(b"\n")
    train, heldout = split_text(text, 0.1)
    assert train + heldout == text and train.endswith("\n")
    assert 0.08 < len(heldout) / len(text) < 0.12


def test_tokenizers(shared_data):
    b = ByteTokenizer()
    assert b.decode(b.encode("naïve = 1")) == "naïve = 1"
    sp = load_tokenizer(shared_data / "tokenizer" / "llama2_tokenizer.model")
    assert sp.vocab_size == 32000 and sp.bos_id == 1 and sp.eos_id == 2
    assert sp.encode("Hello world, this is a test.") == [15043, 3186, 29892, 445, 338, 263, 1243, 29889]
    with pytest.raises(ValueError, match="not understood"):
        load_tokenizer("/nonexistent/tok")


def test_measure_decode_counts_syncs_per_token():
    m = _model(n_layers=4)
    res = measure_decode(m, _ids(8), new_tokens=5, warmup=1)
    assert res.syncs_per_token == 2 * 4 and res.ms_per_token > 0
    p = parallelise(m, TABLE1[3], 0, 4)  # rate 2, sub-layer, iterative: 2 groups x 2 passes x 2 syncs
    assert measure_decode(p, _ids(8), new_tokens=5, warmup=1).syncs_per_token == 8
    with pytest.raises(ValueError, match="max_seq_len"):
        measure_decode(m, _ids(60), new_tokens=10)


# ---------------------------------------------------------------------------------------------- lm-eval adapter
class _Req:
    def __init__(self, *args):
        self.args = args


@torch.no_grad()
def _logprob_sum(model, ids, first):
    """Sum of log p(ids[t] | ids[:t]) for t >= first, computed in one forward."""
    x = torch.tensor(ids).view(1, -1)
    logp = F.log_softmax(model(x[:, :-1])[0], -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(first, len(ids)))


def test_lm_eval_loglikelihood_and_greedy_flag():
    pytest.importorskip("lm_eval")
    from tpblocks.posthoc.lm_eval_adapter import TpblocksLM

    m, tok = _model(max_seq_len=128), ByteTokenizer()
    lm = TpblocksLM(m, tok)
    ctx, cont = "The cat sat", " on the mat"
    ((ll, greedy),) = lm.loglikelihood([_Req(ctx, cont)])
    ids = tok.encode(ctx + cont)
    assert ll == pytest.approx(_logprob_sum(m, ids, len(ctx)), rel=1e-5)
    # Continuation equal to the greedy choice -> is_greedy True.
    gen = lm.generate_until([_Req(ctx, {"until": [], "max_gen_toks": 3})])[0]
    with torch.no_grad():
        x = torch.tensor(tok.encode(ctx)).view(1, -1)
        expect = []
        for _ in range(3):
            nxt = int(m(x)[0, -1].argmax())
            expect.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    assert tok.encode(gen) == expect or gen == tok.decode(expect)
    ((_, g2),) = lm.loglikelihood([_Req(ctx, tok.decode(expect))])
    assert g2 is True
    ((_, g3),) = lm.loglikelihood([_Req(ctx, tok.decode([(expect[0] + 1) % 256] + expect[1:]))])
    assert g3 is False


def test_lm_eval_rolling_loglikelihood_over_several_windows():
    pytest.importorskip("lm_eval")
    from tpblocks.posthoc.lm_eval_adapter import TpblocksLM

    m, tok = _model(max_seq_len=128), ByteTokenizer()
    lm = TpblocksLM(m, tok, max_length=16)
    text = "abcdefghij klmnopqrstuvwxyz 0123456789"  # 38 bytes -> 3 windows of 16
    (ll,) = lm.loglikelihood_rolling([_Req(text)])
    ids = [lm.prefix_token_id] + tok.encode(text)
    expected = 0.0
    for begin in range(0, len(ids) - 1, 16):  # non-overlapping windows, each scores its own 16 tokens
        chunk = ids[begin : begin + 17]
        expected += _logprob_sum(m, chunk, 1)
    assert ll == pytest.approx(expected, rel=1e-5)


def test_lm_eval_generate_until_stops_at_stop_string():
    pytest.importorskip("lm_eval")
    from tpblocks.posthoc.lm_eval_adapter import TpblocksLM

    m, tok = _model(max_seq_len=128), ByteTokenizer()
    lm = TpblocksLM(m, tok)
    full = lm.generate_until([_Req("hello", {"until": [], "max_gen_toks": 12})])[0]
    assert len(tok.encode(full)) >= 8  # replacement chars from partial UTF-8 may expand; it generated
    stop = full[2:4]
    if stop:
        cut = lm.generate_until([_Req("hello", {"until": [stop], "max_gen_toks": 12})])[0]
        assert stop not in cut and full.startswith(cut)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lm_eval_runs_a_local_multiple_choice_task(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tpblocks.posthoc.lm_eval_adapter import TpblocksLM

    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"question": "1 2 3 4", "choices": [" 5", " x"], "label": 0}\n'
        '{"question": "a b c d", "choices": [" e", " 9"], "label": 0}\n'
    )
    (tmp_path / "task.yaml").write_text(
        "task: tpblocks_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: label\ndoc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n"
    )
    m, tok = _model(max_seq_len=128), ByteTokenizer()
    lm = TpblocksLM(m, tok)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=["tpblocks_local_mc"], task_manager=tm, bootstrap_iters=0, log_samples=True)
    acc = res["results"]["tpblocks_local_mc"]["acc,none"]
    # Independent scoring of the same two questions: pick the choice with the higher log-likelihood.
    expected = 0
    for q, choices in (("1 2 3 4", [" 5", " x"]), ("a b c d", [" e", " 9"])):
        scores = [_logprob_sum(m, tok.encode(q + c), len(tok.encode(q))) for c in choices]
        expected += int(scores.index(max(scores)) == 0)
    assert acc == pytest.approx(expected / 2)
