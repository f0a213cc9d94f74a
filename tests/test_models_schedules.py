"""The other communication schedules (PaLM, Ladder, Kraken, Parallel Track): structure and sync counts."""

import pytest
import torch
from test_models import assert_single_lane_block_equals_dense_stack, randomise_

from tpblocks.models import LocalComm, build_model, get_flavor
from tpblocks.models.layers import DecoderLayer


def test_palm_branches_read_the_same_normalised_input():
    model = build_model(get_flavor("debug_palm"))
    randomise_(model)
    layer = model.stages[0]
    seen = {}
    layer.attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn", args[0]))
    layer.ffn.register_forward_hook(lambda m, args, out: seen.__setitem__("ffn", args[0]))
    x = torch.randn(2, 5, 64)
    y = layer(x, LocalComm())
    assert seen["attn"] is seen["ffn"]
    torch.testing.assert_close(y, x + layer.attn(seen["attn"]) + layer.ffn(seen["ffn"]))


def ladder_reference(layers: list[DecoderLayer], x: torch.Tensor) -> torch.Tensor:
    """Ladder residual written out sub-layer by sub-layer: f_k reads h without o_{k-1}."""
    subs = []
    for layer in layers:
        subs.append(lambda h, layer=layer: layer.attn(layer.attn_norm(h)))
        subs.append(lambda h, layer=layer: layer.ffn(layer.ffn_norm(h)))
    h, previous = x, torch.zeros_like(x)
    for f in subs:
        out = f(h)
        h = h + previous
        previous = out
    return h + previous


def test_ladder_matches_reference_and_differs_from_llama():
    ladder = build_model(get_flavor("debug_ladder"))
    randomise_(ladder)
    x = torch.randn(2, 6, 64)
    stack = ladder.stages[0]
    torch.testing.assert_close(stack(x, LocalComm()), ladder_reference(list(stack.layers), x))
    sequential = x
    for layer in stack.layers:
        sequential = layer(sequential, LocalComm())
    assert (sequential - stack(x, LocalComm())).abs().max() > 1e-3  # it is a different model, not a re-ordering


def test_track_with_one_lane_equals_dense_stack():
    cfg = get_flavor("debug_track", lane_count=1, lane_n_heads=4, lane_n_kv_heads=2, lane_ffn_factor=2.0,
                     tp_block_repetition=1)  # fmt: skip
    assert_single_lane_block_equals_dense_stack(build_model(cfg).stages[0], cfg)


def test_track_merges_by_summing_lane_updates():
    model = build_model(get_flavor("debug_track"))
    randomise_(model)
    block = model.stages[0]
    x = torch.randn(1, 4, 64)
    states = []
    out = block(x, LocalComm(), lane_states=states)
    torch.testing.assert_close(out, x + (states[-1] - x).sum(0))


def test_kraken_other_lanes_enter_only_the_next_layers_ffn():
    model = build_model(get_flavor("debug_kraken", n_layers=3))
    randomise_(model)
    block = model.stages[0]
    x = torch.randn(1, 5, 64)
    ffn_inputs = []
    for layer in block.layers:
        original = layer.feed_forward
        layer.feed_forward = lambda t, original=original: (ffn_inputs.append(t), original(t))[1]
    block(x, LocalComm())
    # lane 0's FFN input at layer 1 depends on lane 1's layer-0 weights; at layer 0 it does not.
    before = [t.clone() for t in ffn_inputs]
    ffn_inputs.clear()
    with torch.no_grad():
        block.layers[0].w_up[1] += 0.3
    block(x, LocalComm())
    assert torch.equal(ffn_inputs[0][0], before[0][0])
    assert (ffn_inputs[1][0] - before[1][0]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "flavor, blocking, overlapped",
    [
        ("debug_palm", lambda c: c.n_layers, lambda c: 0),
        ("debug_ladder", lambda c: 0, lambda c: 2 * c.n_layers),
        ("debug_kraken", lambda c: 1, lambda c: c.n_layers - 1),
        ("debug_track", lambda c: c.tp_block_repetition, lambda c: 0),
    ],
)
def test_syncs_per_token_match_each_schedule(flavor, blocking, overlapped):
    cfg = get_flavor(flavor)
    model = build_model(cfg).eval()
    cache = model.new_cache(16)
    model(torch.randint(0, 256, (1, 4)), cache)
    model.comm.counter.reset()
    model(torch.randint(0, 256, (1, 1)), cache)  # one decode step = one token
    assert model.comm.counter.blocking == blocking(cfg)
    assert model.comm.counter.overlapped == overlapped(cfg)


def test_no_communication_ceiling_counts_but_skips_work():
    model = build_model(get_flavor("debug_track"))
    model.comm.enabled = False
    tokens = torch.randint(0, 256, (1, 6))
    out_off = model(tokens)
    model.comm.enabled = True
    torch.testing.assert_close(out_off, model(tokens))  # one process: the collectives were local anyway
    assert model.comm.counter.blocking == 2 * get_flavor("debug_track").tp_block_repetition
