"""Post-hoc parallelisation (Scotti & Carman, Table 1): identities, semantics, KV cache, sync counts, validation."""

import copy

import pytest
import torch

from tpblocks.models import TransformerLM, get_flavor
from tpblocks.models.layers import DecoderLayer
from tpblocks.posthoc.parallelise import (
    TABLE1,
    ParallelConfig,
    ParallelGroup,
    config_by_name,
    effective_depth,
    parallelise,
)


def _model(n_layers=8, seed=0):
    torch.manual_seed(seed)
    return TransformerLM(get_flavor("debug_llama", n_layers=n_layers, max_seq_len=64)).eval()


def _tokens(b=2, s=12, seed=1):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def test_table1_columns_match_the_paper():
    # Transcribed from the paper's Table 1 (IDs 1..16): rate, level, iterative, averaged.
    rate = [2] * 8 + [4] * 8
    level = (["sub-layer"] * 4 + ["layer"] * 4) * 2
    iterative = [False, False, True, True] * 4
    averaged = [False, True] * 8
    assert sorted(TABLE1) == list(range(1, 17))
    for i in range(16):
        c = TABLE1[i + 1]
        assert (c.rate, c.level, c.iterative, c.averaged) == (rate[i], level[i], iterative[i], averaged[i]), i + 1
    assert len({c.name for c in TABLE1.values()}) == 16


@pytest.mark.parametrize("cid", [1, 6, 11, 16])
def test_config_by_name_accepts_ids_and_names(cid):
    c = TABLE1[cid]
    assert config_by_name(cid) == c
    assert config_by_name(f"cfg{cid}") == c
    assert config_by_name(c.name) == c
    assert config_by_name(c.name.upper()) == c
    assert c.table1_id == cid


def test_config_names_are_readable():
    assert config_by_name("r2-layer-iter") == ParallelConfig(rate=2, level="layer", iterative=True)
    assert config_by_name("r4-sub-layer-avg") == ParallelConfig(rate=4, level="sub-layer", averaged=True)
    with pytest.raises(ValueError, match="1..16"):
        config_by_name(17)
    with pytest.raises(ValueError, match="unknown parallel configuration"):
        config_by_name("r3-layer")


@pytest.mark.parametrize("level", ["sub-layer", "layer"])
@pytest.mark.parametrize("iterative", [False, True])
@pytest.mark.parametrize("averaged", [False, True])
def test_rate_one_changes_nothing(level, iterative, averaged):
    m, x = _model(), _tokens()
    p = parallelise(m, ParallelConfig(rate=1, level=level, iterative=iterative, averaged=averaged), 1, 7)
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=0)


def test_empty_range_changes_nothing_for_every_config():
    m, x = _model(), _tokens()
    ref = m(x)
    for c in TABLE1.values():
        p = parallelise(m, c, 4, 4)
        assert all(type(s) is DecoderLayer for s in p.stages)
        torch.testing.assert_close(p(x), ref, rtol=0, atol=0)


def test_parallelise_copies_and_leaves_the_original_alone():
    m, x = _model(), _tokens()
    ref = m(x)
    p = parallelise(m, TABLE1[5], 2, 6)
    assert all(type(s) is DecoderLayer for s in m.stages)
    assert len(p.stages) == 8 - 2
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    assert not torch.allclose(p(x), ref, atol=1e-4)  # it really changed the function


def _with_identical_pair(m, i):
    """Layer i+1 becomes an exact copy of layer i."""
    m.stages[i + 1].load_state_dict(m.stages[i].state_dict())
    return m


def _drop_layer(m, i):
    """A model equal to ``m`` without layer i (a fresh TransformerLM with one layer fewer)."""
    short = TransformerLM(m.cfg.replace(n_layers=m.cfg.n_layers - 1)).eval()
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith("stages."):
            j = int(k.split(".")[1])
            if j == i:
                continue
            k = f"stages.{j - (j > i)}." + k.split(".", 2)[2]
        sd[k] = v
    short.load_state_dict(sd)
    return short


@pytest.mark.parametrize("level", ["layer", "sub-layer"])
def test_averaged_group_of_two_identical_layers_equals_one_layer(level):
    m, x = _with_identical_pair(_model(n_layers=4), 1), _tokens()
    p = parallelise(m, ParallelConfig(rate=2, level=level, averaged=True), 1, 3)
    torch.testing.assert_close(p(x), _drop_layer(m, 2)(x), rtol=1e-5, atol=1e-5)
    # Summing instead of averaging doubles the update: it must differ.
    s = parallelise(m, ParallelConfig(rate=2, level=level, averaged=False), 1, 3)
    assert not torch.allclose(s(x), p(x), atol=1e-3)


def test_iterative_averaged_layer_group_of_identical_layers_recovers_the_sequential_model():
    # Two identical layers: each pass equals one layer, and two passes equal the original 2-layer sequence.
    m, x = _with_identical_pair(_model(n_layers=4), 1), _tokens()
    p = parallelise(m, ParallelConfig(rate=2, level="layer", iterative=True, averaged=True), 1, 3)
    torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-5)


def test_sub_layer_and_layer_semantics_by_hand():
    m, x = _model(n_layers=4), _tokens()
    l0, l1 = m.stages[1], m.stages[2]
    comm = m.comm

    def head(h):
        for layer in m.stages[3:]:
            h = layer(h, comm)
        return m.output(m.norm(h))

    h = m.stages[0](m.tok_embeddings(x), comm)
    # sub-layer, summed: attentions from the same input, then FFNs from the same (updated) input
    a = h + l0.attn(l0.attn_norm(h)) + l1.attn(l1.attn_norm(h))
    sl = a + l0.ffn(l0.ffn_norm(a)) + l1.ffn(l1.ffn_norm(a))
    torch.testing.assert_close(parallelise(m, TABLE1[1], 1, 3)(x), head(sl), rtol=1e-5, atol=1e-5)
    # layer, summed: whole layers from the same input, residual updates summed
    la = h + (l0(h, comm) - h) + (l1(h, comm) - h)
    torch.testing.assert_close(parallelise(m, TABLE1[5], 1, 3)(x), head(la), rtol=1e-5, atol=1e-5)
    # layer, iterative, averaged: the averaged group applied twice
    it = h
    for _ in range(2):
        it = it + 0.5 * ((l0(it, comm) - it) + (l1(it, comm) - it))
    torch.testing.assert_close(parallelise(m, TABLE1[8], 1, 3)(x), head(it), rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_matches_full_forward_for_all_16_configs():
    m, x = _model(), _tokens(b=1, s=10)
    for cid, c in TABLE1.items():
        p = parallelise(m, c, 0, 8)
        full = p(x)
        cache = p.new_cache(16)
        steps = [p(x[:, :4], cache)] + [p(x[:, t : t + 1], cache) for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5, msg=f"cfg{cid}")
        extra = p.n_cache_slots - 8
        assert extra == (8 * (c.rate - 1) if c.iterative else 0), cid  # later passes get their own slots


def test_iterative_passes_use_distinct_cache_slots_and_first_pass_keeps_original():
    p = parallelise(_model(), TABLE1[15], 0, 8)  # rate 4, iterative: 2 groups x 4 passes
    groups = [s for s in p.stages if isinstance(s, ParallelGroup)]
    assert [g.slots[0] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    flat = [slot for g in groups for pass_ in g.slots for slot in pass_]
    assert len(flat) == len(set(flat)) == p.n_cache_slots == 32


@pytest.mark.parametrize("cid", list(TABLE1))
def test_counted_syncs(cid):
    c = TABLE1[cid]
    m, x = _model(), _tokens()
    p = parallelise(m, c, 2, 6)
    p.comm.counter.reset()
    p(x)
    n_groups = 4 // c.rate
    passes = c.rate if c.iterative else 1
    # 4 layers outside the range keep 2 reductions each; each group pass reduces attention once and FFN once.
    assert p.comm.counter.blocking == 4 * 2 + n_groups * passes * 2
    assert p.comm.counter.by_kind["tp_reduce"] == p.comm.counter.blocking


def test_effective_depth():
    assert effective_depth(8, TABLE1[1], 2, 6) == 6
    assert effective_depth(8, TABLE1[9], 0, 8) == 2
    assert effective_depth(8, TABLE1[15], 0, 8) == 8
    assert effective_depth(8, ParallelConfig(rate=1), 0, 8) == 8


def test_validation_messages():
    m = _model()
    with pytest.raises(ValueError, match="multiple of rate=4"):
        parallelise(m, TABLE1[9], 0, 6)
    with pytest.raises(ValueError, match="0 <= start <= end <= 8"):
        parallelise(m, TABLE1[1], 4, 10)
    with pytest.raises(ValueError, match="rate=0"):
        ParallelConfig(rate=0)
    with pytest.raises(ValueError, match="level="):
        ParallelConfig(level="block")
    p = parallelise(m, TABLE1[1], 0, 4)
    with pytest.raises(ValueError, match="not a plain DecoderLayer"):
        parallelise(p, TABLE1[1], 0, 2)
    burger = TransformerLM(get_flavor("debug_burger"))
    with pytest.raises(ValueError, match="not a plain DecoderLayer"):
        parallelise(burger, TABLE1[1], 0, 2)


def test_gradients_flow_through_groups():
    m, x = _model(n_layers=4), _tokens()
    p = parallelise(copy.deepcopy(m).train(), TABLE1[7], 0, 4)
    p(x).sum().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in p.stages.parameters())
