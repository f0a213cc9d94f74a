"""Delayed Tensor Parallelism (``arch="dtp"``, Kog's Laneformer) in one process.

* every layer *present* == the dense Llama whose weights are the lanes' shards concatenated (lane-major heads,
  interleaved RoPE turned into rotate-half by the usual per-head permutation);
* the *past* / *present* / *no_reduce* rules (and ``use_comm=false``: independent lanes) against a direct loop
  over lanes and layers written here with plain tensor ops (complex-number RoPE, explicit GQA);
* every head type, per-lane norms, sync counts against the formula, the release parameter count on meta;
* sliding-window attention: cached decode (dynamic and static cache) == full forwards with the windowed mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tpblocks.infer import perfmodel as pm
from tpblocks.models.config import ModelConfig
from tpblocks.models.flavors import get_flavor
from tpblocks.models.model import TransformerLM, build_model

RTOL, ATOL = 1e-5, 1e-5


def _cfg(**kw) -> ModelConfig:
    base = dict(sliding_window=None, sliding_window_n_layers=None, n_layers=4, broadcast_delay=1)
    return get_flavor("debug_dtp", **{**base, **kw})


def _tokens(cfg: ModelConfig, b: int = 2, s: int = 11, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _randomise_norms(model: TransformerLM) -> None:
    """Norm weights start at one; make them matter (a wrong lane or a shared-vs-per-lane slip must show)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


# ---------------------------------------------------------------------------------------------- reference
def _rope_complex(x_bnse: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's Llama RoPE: features (2i, 2i+1) as one complex number, turned by pos x theta^(-2i/e)."""
    s, e = x_bnse.shape[-2], x_bnse.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, e, 2).float() / e)
    turn = torch.polar(torch.ones(s, e // 2), torch.outer(torch.arange(s).float(), freqs))
    xc = torch.view_as_complex(x_bnse.float().reshape(*x_bnse.shape[:-1], e // 2, 2))
    return torch.view_as_real(xc * turn).flatten(-2)


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _lane_attention(x_bsh, layer, lane: int, cfg: ModelConfig) -> torch.Tensor:
    b, s, h = x_bsh.shape
    e, n, k = cfg.head_dim, cfg.n_heads // cfg.lane_count, cfg.n_kv_heads // cfg.lane_count
    w = layer.attn_norm if layer.attn_norm.dim() == 1 else layer.attn_norm[lane]
    xn = _norm(x_bsh, w, cfg.norm_eps)
    q = (xn @ layer.wq[lane]).view(b, s, n, e).transpose(1, 2)
    kk = (xn @ layer.wk[lane]).view(b, s, k, e).transpose(1, 2)
    v = (xn @ layer.wv[lane]).view(b, s, k, e).transpose(1, 2)
    q, kk = _rope_complex(q, cfg.rope_theta), _rope_complex(kk, cfg.rope_theta)
    kk, v = kk.repeat_interleave(n // k, dim=1), v.repeat_interleave(n // k, dim=1)
    scores = (q @ kk.transpose(-1, -2)) / math.sqrt(e)
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, n * e)
    return o @ layer.wo[lane]


def _lane_ffn(x_bsh, layer, lane: int, cfg: ModelConfig) -> torch.Tensor:
    w = layer.ffn_norm if layer.ffn_norm.dim() == 1 else layer.ffn_norm[lane]
    xn = _norm(x_bsh, w, cfg.norm_eps)
    return (F.silu(xn @ layer.w_gate[lane]) * (xn @ layer.w_up[lane])) @ layer.w_down[lane]


@torch.no_grad()
def _reference_logits(model: TransformerLM, tokens: torch.Tensor) -> torch.Tensor:
    """The DTP forward as a loop over layers, sub-layers and lanes, with every rule spelled out."""
    cfg = model.cfg
    L, delay, rules = cfg.lane_count, cfg.broadcast_delay, cfg.dtp_rules
    x = [model.tok_embeddings(tokens) for _ in range(L)]
    partials: dict[tuple[int, str], list[torch.Tensor]] = {}
    for i, layer in enumerate(model.stages[0].layers):
        for kind, branch in (("attn", _lane_attention), ("ffn", _lane_ffn)):
            p = [branch(x[lane], layer, lane, cfg) for lane in range(L)]
            partials[(i, kind)] = p
            for lane in range(L):
                if rules[i] == "present":
                    x[lane] = x[lane] + sum(p)
                elif rules[i] == "no_reduce":
                    x[lane] = x[lane] + math.sqrt(L) * p[lane]
                else:
                    x[lane] = x[lane] + p[lane]
                    src = i - delay
                    if rules[src] != "present" or cfg.early_comm_resend:
                        x[lane] = x[lane] + sum(q for j, q in enumerate(partials[(src, kind)]) if j != lane)
    w = model.norm.weight
    if cfg.lm_head_type == "replicate":
        return model.output(sum(_norm(x[lane], w, cfg.norm_eps) for lane in range(L)) / L)
    xn = [_norm(x[lane], w if w.dim() == 1 else w[lane], cfg.norm_eps) for lane in range(L)]
    if cfg.lm_head_type == "lane":
        return torch.cat(xn, dim=-1) @ model.output.weight.T
    rows = cfg.vocab_size // L
    return torch.cat([xn[lane] @ model.output.weight[lane * rows : (lane + 1) * rows].T for lane in range(L)], -1)


RULE_CASES = {
    "default (present below δ, past after, resent)": {},
    "no early resend": {"early_comm_resend": False},
    "no early comm (no_reduce below δ)": {"use_early_comm": False},
    "δ=2 of 5 layers": {"broadcast_delay": 2, "n_layers": 5},
    "use_comm=false: independent lanes": {"use_comm": False},
    "lane head, per-lane norms": {"lm_head_type": "lane", "replicated_rmsn_scale": False},
    "vocab-parallel head, 4 lanes": {"lm_head_type": "vocab_parallel", "lane_count": 4, "n_kv_heads": 4},
}


@pytest.mark.parametrize("label", list(RULE_CASES))
def test_rules_match_a_direct_loop_over_lanes(label):
    cfg = _cfg(**RULE_CASES[label])
    torch.manual_seed(0)
    model = build_model(cfg)
    _randomise_norms(model)
    tokens = _tokens(cfg)
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, _reference_logits(model, tokens), rtol=1e-4, atol=1e-5)


def test_use_comm_false_lanes_are_independent():
    """Changing lane 1's weights leaves lane 0's stream untouched (there is no communication before the head)."""
    cfg = _cfg(use_comm=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = _tokens(cfg)
    stack = model.stages[0]
    with torch.no_grad():
        before = stack(model.tok_embeddings(tokens), model.comm)
        for layer in stack.layers:
            layer.wq[1].mul_(3.0)
        after = stack(model.tok_embeddings(tokens), model.comm)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert not torch.allclose(after[1], before[1])
    assert model.comm.counter.snapshot() == {"blocking": 0, "overlapped": 0}


# ---------------------------------------------------------------------------------------------- dense equivalence
def _interleaved_to_rotate_half(w_out_in: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection reordered so rotate-half RoPE computes what interleaved RoPE did (per head)."""
    out, d = w_out_in.shape
    return w_out_in.view(out // head_dim, head_dim // 2, 2, d).transpose(1, 2).reshape(out, d)


@torch.no_grad()
def dense_llama_from_dtp(model: TransformerLM) -> TransformerLM:
    """The Llama whose layers are a DTP model's lanes concatenated: lane-major heads and FFN columns."""
    cfg = model.cfg
    e = cfg.head_dim
    dense = build_model(ModelConfig(
        arch="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, ffn_hidden_size=cfg.ffn_hidden, n_layers=cfg.n_layers, max_seq_len=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, tie_embeddings=cfg.tie_embeddings,
    ))  # fmt: skip

    def cat_out(w_lio):  # (L, in, out/L) -> nn.Linear (out, in), lanes in order
        return torch.cat(list(w_lio), dim=1).T

    for lane_layer, layer in zip(model.stages[0].layers, dense.stages):
        layer.attn_norm.weight.copy_(lane_layer.attn_norm)
        layer.ffn_norm.weight.copy_(lane_layer.ffn_norm)
        layer.attn.wq.weight.copy_(_interleaved_to_rotate_half(cat_out(lane_layer.wq), e))
        layer.attn.wk.weight.copy_(_interleaved_to_rotate_half(cat_out(lane_layer.wk), e))
        layer.attn.wv.weight.copy_(cat_out(lane_layer.wv))
        layer.attn.wo.weight.copy_(torch.cat(list(lane_layer.wo), dim=0).T)
        layer.ffn.w_gate.weight.copy_(cat_out(lane_layer.w_gate))
        layer.ffn.w_up.weight.copy_(cat_out(lane_layer.w_up))
        layer.ffn.w_down.weight.copy_(torch.cat(list(lane_layer.w_down), dim=0).T)
    dense.tok_embeddings.weight.copy_(model.tok_embeddings.weight)
    dense.norm.weight.copy_(model.norm.weight)
    dense.output.weight.copy_(model.output.weight)
    return dense


@pytest.mark.parametrize("lanes", [2, 4])
def test_every_layer_present_equals_the_dense_llama(lanes):
    cfg = _cfg(lane_count=lanes, n_kv_heads=4, broadcast_delay=4)  # δ = n_layers: every layer present
    assert set(cfg.dtp_rules) == {"present"}
    torch.manual_seed(0)
    model = build_model(cfg)
    _randomise_norms(model)
    dense = dense_llama_from_dtp(model)
    tokens = _tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), dense(tokens), rtol=RTOL, atol=ATOL)
    assert model.num_parameters() == dense.num_parameters()


# ---------------------------------------------------------------------------------------------- counts and sizes
@pytest.mark.parametrize("label", list(RULE_CASES))
def test_counted_syncs_equal_the_formula(label):
    cfg = _cfg(**RULE_CASES[label])
    model = build_model(cfg)
    with torch.no_grad():
        model(_tokens(cfg))
    present = cfg.dtp_rules.count("present")
    # written out here: 2 blocking per present layer + the head; 2 async per past layer that hears a non-present one
    hears_started = sum(
        1 for i in range(cfg.n_layers - cfg.broadcast_delay) if cfg.use_comm and cfg.dtp_rules[i] != "present"
    )
    assert (model.comm.counter.blocking, model.comm.counter.overlapped) == (2 * present + 1, 2 * hears_started)
    assert (pm.syncs_for_config(cfg), pm.overlapped_syncs_for_config(cfg)) == (2 * present + 1, 2 * hears_started)


def test_release_config_has_the_published_parameter_count():
    cfg = get_flavor("laneformer_2b")
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_parameters() == 2_320_069_632
    assert cfg.windowed_layers == tuple(range(10))
    blocking, overlapped = pm.syncs_for_config(cfg), pm.overlapped_syncs_for_config(cfg)
    assert (blocking, overlapped) == (2 * 2 + 1, 2 * (15 - 2 * 2))  # δ = 2: layers 0, 1 present; 2..10 start sums


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"n_kv_heads": 1}, "n_kv_heads=1 must be a multiple of lane_count=2"),
        ({"broadcast_delay": 0}, "broadcast_delay=0"),
        ({"lm_head_type": "lane", "tie_embeddings": True}, "cannot be tied"),
        ({"lm_head_type": "vocab_parallel", "tie_embeddings": True}, "cannot stay tied"),
        ({"lm_head_type": "vocab_parallel", "vocab_size": 255}, "vocab_size=255"),
        ({"pre_norm_lane_agg": True, "replicated_rmsn_scale": False}, "pre_norm_lane_agg"),
        ({"lm_head_type": "bogus"}, "lm_head_type"),
        ({"sliding_window": 0}, "sliding_window=0"),
        ({"sliding_window": 4, "sliding_window_n_layers": 9}, "sliding_window_n_layers=9"),
    ],
)
def test_bad_dtp_configs_fail_with_the_field_named(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        _cfg(**overrides)


def test_pre_norm_lane_agg_sums_lanes_before_the_final_norm():
    cfg = _cfg(pre_norm_lane_agg=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = _tokens(cfg)
    with torch.no_grad():
        lanes = model.stages[0](model.tok_embeddings(tokens), model.comm)
        want = model.output(model.norm(lanes.sum(0)))
        torch.testing.assert_close(model(tokens), want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------- RoPE, window
def test_interleaved_rope_is_the_complex_pair_rotation():
    from tpblocks.models.layers import RotaryEmbedding

    x = torch.randn(2, 3, 7, 8)
    rope = RotaryEmbedding(8, 16, 500.0, interleaved=True)
    torch.testing.assert_close(rope(x, 0), _rope_complex(x, 500.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope(x[:, :, 3:], 3), _rope_complex(x, 500.0)[:, :, 3:], rtol=1e-5, atol=1e-5)


WINDOW_ARCHS = {
    "dtp": ("debug_dtp", {}),
    "llama": ("debug_llama", {"sliding_window": 5, "sliding_window_n_layers": -1}),
    "burger": ("debug_burger", {"sliding_window": 4}),
}


def _full_forward_logits(model: TransformerLM, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the last position of every prefix, each from a forward without a cache (the mask alone)."""
    return torch.stack([model(tokens[:, : t + 1])[:, -1] for t in range(tokens.shape[1])], dim=1)


@pytest.mark.parametrize("arch", list(WINDOW_ARCHS))
def test_sliding_window_decode_with_cache_equals_full_forwards(arch):
    flavor, overrides = WINDOW_ARCHS[arch]
    cfg = get_flavor(flavor, **overrides)
    assert cfg.windowed_layers
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = _tokens(cfg, b=2, s=14)
    with torch.no_grad():
        want = _full_forward_logits(model, tokens)
        prompt = 5
        cache = model.new_cache(32)  # dynamic cache: prefill 5, then one token at a time
        got = [model(tokens[:, :prompt], cache)[:, -1]]
        got += [model(tokens[:, t : t + 1], cache)[:, -1] for t in range(prompt, tokens.shape[1])]
        torch.testing.assert_close(torch.stack(got, 1), want[:, prompt - 1 :], rtol=1e-4, atol=1e-5)
        static = model.setup_cache(2, 32)  # the decode engine's cache: masks over the whole buffer
        pos = torch.arange(prompt)
        got = [model(tokens[:, :prompt], static.at(pos))[:, -1]]
        got += [model(tokens[:, t : t + 1], static.at(torch.tensor([t])))[:, -1] for t in range(prompt, 14)]
        torch.testing.assert_close(torch.stack(got, 1), want[:, prompt - 1 :], rtol=1e-4, atol=1e-5)
        # the window matters: without it the same weights give other logits
        unwindowed = build_model(cfg.replace(sliding_window=None, sliding_window_n_layers=None))
        unwindowed.load_state_dict(model.state_dict())
        assert not torch.allclose(unwindowed(tokens)[:, -1], want[:, -1], atol=1e-4)


def test_windowed_attention_sees_only_the_window():
    """A token further back than the window changes nothing in a one-layer windowed model; nearer ones do."""
    cfg = get_flavor("debug_llama", n_layers=1, sliding_window=3)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = _tokens(cfg, b=1, s=8)
    far, near = tokens.clone(), tokens.clone()
    far[0, 4], near[0, 5] = (tokens[0, 4] + 1) % cfg.vocab_size, (tokens[0, 5] + 1) % cfg.vocab_size
    with torch.no_grad():
        last = model(tokens)[0, -1]
        torch.testing.assert_close(model(far)[0, -1], last, rtol=0, atol=0)  # position 4 < 7 - 3 + 1
        assert not torch.allclose(model(near)[0, -1], last)
