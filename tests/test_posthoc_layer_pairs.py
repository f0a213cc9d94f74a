"""Layer Parallelism: pair semantics, KV cache slots, counted syncs, 2-rank placement; Table-1 groups under TP."""

import copy

import pytest
import torch

from tpblocks.models import TransformerLM, get_flavor
from tpblocks.posthoc.layer_pairs import (
    LayerPair,
    LayerPairConfig,
    apply_layer_pairs,
    distribute_layer_pairs,
    expected_lp_syncs_per_token,
)
from tpblocks.posthoc.parallelise import TABLE1, expected_syncs_per_token, parallelise


def _model(n_layers=6, seed=0):
    torch.manual_seed(seed)
    return TransformerLM(get_flavor("debug_llama", n_layers=n_layers, max_seq_len=64)).eval()


def _tokens(b=2, s=10, seed=1):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def test_pair_sums_residual_updates_of_layers_with_their_own_norms():
    m, x = _model(), _tokens()
    comm = m.comm
    h = m.tok_embeddings(x)
    for i in range(6):
        if i in (1, 3):  # pairs (1,2) and (3,4)
            a, b = m.stages[i], m.stages[i + 1]
            h = h + (a(h, comm) - h) + (b(h, comm) - h)
        elif i not in (2, 4):
            h = m.stages[i](h, comm)
    expected = m.output(m.norm(h))
    lp = apply_layer_pairs(m, LayerPairConfig(start=1, end=5))
    assert len(lp.stages) == 4 and sum(isinstance(s, LayerPair) for s in lp.stages) == 2
    torch.testing.assert_close(lp(x), expected, rtol=1e-5, atol=1e-5)
    # each member keeps its own norm weights (they are the original modules' copies)
    pair = lp.stages[1]
    torch.testing.assert_close(pair.members[1].attn_norm.weight, m.stages[2].attn_norm.weight)


def test_empty_range_is_identity_and_odd_range_is_rejected():
    m, x = _model(), _tokens()
    torch.testing.assert_close(apply_layer_pairs(m, LayerPairConfig(start=3, end=3))(x), m(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="odd number of layers"):
        LayerPairConfig(start=1, end=4)
    with pytest.raises(ValueError, match="exceeds the model's 6 layers"):
        apply_layer_pairs(m, LayerPairConfig(start=4, end=8))


def test_kv_cache_stays_at_original_slots_and_decode_matches():
    m, x = _model(), _tokens(b=1)
    lp = apply_layer_pairs(m, LayerPairConfig(start=0, end=6))
    slots = [[mem.attn.cache_slot for mem in p.members] for p in lp.stages]
    assert slots == [[0, 1], [2, 3], [4, 5]]
    assert lp.n_cache_slots == 6
    full = lp(x)
    cache = lp.new_cache(16)
    steps = [lp(x[:, :3], cache)] + [lp(x[:, t : t + 1], cache) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("start,end", [(0, 2), (1, 5), (0, 6)])
def test_one_counted_sync_per_pair(start, end):
    m, x = _model(), _tokens()
    lp = apply_layer_pairs(m, LayerPairConfig(start=start, end=end))
    lp.comm.counter.reset()
    lp(x)
    pairs = (end - start) // 2
    assert lp.comm.counter.blocking == 2 * (6 - 2 * pairs) + pairs
    assert expected_lp_syncs_per_token(6, LayerPairConfig(start=start, end=end)) == lp.comm.counter.blocking


def _distributed_worker(rank, world):
    from tpblocks.parallel import CollectiveAudit, MeshComm, shard_model

    m, x = _model(), _tokens()
    cfg = LayerPairConfig(start=1, end=5)
    ref = apply_layer_pairs(m, cfg)(x)
    base_tp_params = sum(p.numel() for p in m.stages[1].parameters())
    d = distribute_layer_pairs(m, cfg, MeshComm())
    pairs = [s for s in d.stages if isinstance(s, LayerPair)]
    # member j of each pair is whole on rank j; the other member's weights are gone
    for p in pairs:
        assert p.owned == [rank]
        assert sum(q.numel() for q in p.parameters()) == base_tp_params
    with torch.no_grad(), CollectiveAudit() as audit:
        d.comm.counter.reset()
        out = d(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # 2 tensor-parallel layers outside the pairs (2 all-reduces each) + 1 all-reduce per pair
    assert d.comm.counter.blocking == 2 * 2 + 2
    assert audit.calls["all_reduce"] == 2 * 2 + 2 and audit.total == audit.calls["all_reduce"]
    cache = d.new_cache(16)
    with torch.no_grad():
        steps = [d(x[:, :4], cache)] + [d(x[:, t : t + 1], cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-5)

    # Table-1 groups under real 2-way tensor parallelism: partial outputs reduced once per sub-layer kind.
    for cid in (1, 5, 8, 13):
        c = TABLE1[cid]
        ref = parallelise(m, c, 2, 6)(x)
        sharded = parallelise(shard_model(copy.deepcopy(m), MeshComm()), c, 2, 6, inplace=True)
        with torch.no_grad(), CollectiveAudit() as audit:
            sharded.comm.counter.reset()
            out = sharded(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert audit.calls["all_reduce"] == sharded.comm.counter.blocking == expected_syncs_per_token(6, c, 2, 6)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_rank_layer_parallelism_matches_single_process():
    from dist_utils import run_workers

    run_workers(_distributed_worker, world=2)


def test_distribute_needs_two_ranks():
    from tpblocks.models.comm import LocalComm

    with pytest.raises(ValueError, match="2 ranks"):
        distribute_layer_pairs(_model(), LayerPairConfig(start=0, end=2), LocalComm())
