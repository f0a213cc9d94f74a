"""Model zoo: structure of TP blocks, recipes, delayed communication, decode, counting."""

import pytest
import torch

from tpblocks.models import LocalComm, ModelConfig, build_model, get_flavor
from tpblocks.models.lanes import add_into_own_slice, own_slices
from tpblocks.models.layers import DecoderLayer, RotaryEmbedding
from tpblocks.models.tp_block import TPBlock

RECIPES = ["debug_llama", "debug_burger", "debug_sandwich", "debug_palm", "debug_ladder", "debug_kraken", "debug_track"]


def tp_cfg(**kw) -> ModelConfig:
    base = dict(
        arch="tp_blocks", vocab_size=97, hidden_size=32, n_heads=4, n_kv_heads=2, lane_count=4, lane_depth=3,
        lane_n_heads=2, lane_n_kv_heads=1, max_seq_len=64,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def randomise_(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (norm weights and gates included) so no path hides behind a one or zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


# ---------------------------------------------------------------------------------------------- TP block structure
def assert_single_lane_block_equals_dense_stack(block: torch.nn.Module, cfg: ModelConfig) -> None:
    """Load random dense layers into a one-lane block's lane 0; the block must then be exactly that stack."""
    rope = block.layers[0].rope
    width = cfg.lane_hidden_size
    dense = [
        DecoderLayer(width, cfg.lane_heads, cfg.lane_kv_heads, cfg.lane_ffn_hidden, cfg.norm_eps, rope)
        for _ in range(cfg.lane_depth)
    ]
    for depth, layer in enumerate(dense):
        randomise_(layer)
        block.layers[depth].load_dense_(0, layer)
    x = torch.randn(2, 7, width)
    expected = x
    for layer in dense:
        expected = layer(expected, LocalComm())
    torch.testing.assert_close(block(x, LocalComm()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["sandwich", "burger"])
def test_single_lane_block_equals_dense_stack(recipe):
    cfg = tp_cfg(recipe=recipe, lane_count=1, lane_n_heads=4, lane_n_kv_heads=2)
    assert_single_lane_block_equals_dense_stack(TPBlock(cfg, RotaryEmbedding(cfg.lane_head_dim, 64)), cfg)


def test_sandwich_equals_independent_narrow_models():
    cfg = tp_cfg(recipe="sandwich", lane_count=4)
    lane_width = cfg.lane_hidden_size
    rope = RotaryEmbedding(cfg.lane_head_dim, cfg.max_seq_len)
    block = TPBlock(cfg, rope)
    narrow = [
        [DecoderLayer(lane_width, 2, 1, cfg.lane_ffn_hidden, cfg.norm_eps, rope) for _ in range(cfg.lane_depth)]
        for _ in range(cfg.lane_count)
    ]
    for lane, stack in enumerate(narrow):
        for depth, layer in enumerate(stack):
            randomise_(layer)
            block.layers[depth].load_dense_(lane, layer)
    x = torch.randn(2, 5, 32)
    outputs = []
    for lane, stack in enumerate(narrow):
        h = x[..., lane * lane_width : (lane + 1) * lane_width]
        for layer in stack:
            h = layer(h, LocalComm())
        outputs.append(h)
    torch.testing.assert_close(block(x, LocalComm()), torch.cat(outputs, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lane_offset", [0, 2])
def test_burger_ffn_writes_only_its_own_slice(lane_offset):
    cfg = tp_cfg(recipe="burger", lane_count=4)
    block = TPBlock(cfg, RotaryEmbedding(cfg.lane_head_dim, 64), lanes=2, lane_offset=lane_offset)
    layer = block.layers[0]
    randomise_(layer)
    x_lbsd = torch.randn(2, 3, 5, 32)
    ffn_out = layer.feed_forward(x_lbsd)
    assert ffn_out.shape == (2, 3, 5, 8)  # truncated down-projection: h / L features
    changed = (add_into_own_slice(x_lbsd, ffn_out, lane_offset) - x_lbsd).abs().amax(dim=(1, 2))  # (lanes, h)
    for i in range(2):
        own = slice((lane_offset + i) * 8, (lane_offset + i + 1) * 8)
        assert (changed[i, own] > 0).all(), "the lane's own slice must receive its FFN output"
        outside = torch.ones(32, dtype=torch.bool)
        outside[own] = False
        assert (changed[i, outside] == 0).all(), "features outside the lane's slice must be carried unchanged"


def test_burger_merge_samples_slice_l_of_lane_l():
    x_lbsd = torch.arange(4 * 1 * 1 * 8, dtype=torch.float32).view(4, 1, 1, 8)  # 4 lanes, slices of 2
    merged = own_slices(x_lbsd, lane_offset=0, slice_size=2)
    expected = torch.cat([x_lbsd[lane, :, :, 2 * lane : 2 * lane + 2] for lane in range(4)], -1)
    torch.testing.assert_close(merged, expected)


# ---------------------------------------------------------------------------------------------- delayed communication
def lane_states(block: TPBlock, x: torch.Tensor) -> list[torch.Tensor]:
    states: list[torch.Tensor] = []
    block(x, LocalComm(), lane_states=states)
    return states


@pytest.mark.parametrize("recipe", ["sandwich", "burger"])
@pytest.mark.parametrize("reception", ["sum", "mean", "gated"])
def test_delayed_communication_arrives_exactly_after_length_layers(recipe, reception):
    start, length = 1, 2
    cfg = tp_cfg(recipe=recipe, lane_depth=6, delayed_comm=True, comm_start=start, comm_length=length,
                 comm_interleave=5, comm_reception=reception)  # fmt: skip
    assert cfg.delayed_sends == (start,)
    block = TPBlock(cfg, RotaryEmbedding(cfg.lane_head_dim, 64))
    randomise_(block)  # gates become non-zero, so "gated" listens too
    x = torch.randn(1, 6, 32)
    before = lane_states(block, x)
    with torch.no_grad():
        block.layers[0].wq[2] += 0.5  # perturb lane j = 2 at its first layer
    after = lane_states(block, x)
    for depth in range(cfg.lane_depth):
        for lane in (0, 1, 3):
            moved = (after[depth][lane] - before[depth][lane]).abs().max().item()
            if depth < start + length:
                assert moved == 0.0, f"lane {lane} heard lane 2 at depth {depth}, before {start}+{length}"
            else:
                assert moved > 1e-4, f"lane {lane} did not hear lane 2 at depth {depth}"
        assert (after[depth][2] - before[depth][2]).abs().max() > 0  # the perturbed lane itself changes at once


def test_gated_reception_starts_closed():
    cfg = tp_cfg(recipe="burger", lane_depth=4, delayed_comm=True, comm_start=0, comm_length=1)
    model = build_model(cfg)
    isolated = build_model(cfg.replace(delayed_comm=False))
    isolated.load_state_dict({k: v for k, v in model.state_dict().items() if "reception" not in k})
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(tokens), isolated(tokens))


def test_delayed_send_schedule():
    cfg = tp_cfg(lane_depth=8, delayed_comm=True, comm_start=1, comm_interleave=2, comm_length=2)
    assert cfg.delayed_sends == (1, 4)  # 7 would be received after layer 9 > 7: dropped
    with pytest.raises(ValueError, match="comm_start"):
        tp_cfg(lane_depth=3, delayed_comm=True, comm_start=2, comm_length=1)


# ---------------------------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("flavor", RECIPES)
def test_causal(flavor):
    model = build_model(get_flavor(flavor))
    randomise_(model)
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("flavor", RECIPES)
def test_gradients_reach_every_parameter(flavor):
    model = build_model(get_flavor(flavor))
    tokens = torch.randint(0, 256, (2, 12))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("flavor", RECIPES)
def test_incremental_decode_equals_full_forward(flavor):
    model = build_model(get_flavor(flavor)).eval()
    randomise_(model)
    tokens = torch.randint(0, 256, (2, 14))
    full = model(tokens)
    cache = model.new_cache(32)
    pieces = [model(tokens[:, :6], cache)]  # prefill
    pieces += [model(tokens[:, 6:9], cache)]  # chunked prefill on top of a cache
    pieces += [model(tokens[:, i : i + 1], cache) for i in range(9, 14)]  # one-token decode
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.pos == 14


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (get_flavor("debug_llama"), 2 * 4),
        (tp_cfg(tp_block_repetition=3, n_classic_layers=2), 3 * (2 * 2 + 1)),
        (tp_cfg(tp_block_repetition=2, n_classic_layers=0, delayed_comm=True, comm_length=1), 2 * 1),
    ],
)
def test_blocking_syncs_per_forward_match_eq10(cfg, expected):
    model = build_model(cfg)
    model(torch.randint(0, cfg.vocab_size, (1, 4)))
    assert model.comm.counter.blocking == expected
    if cfg.delayed_comm:  # overlapped sends are counted apart from the blocking ones
        assert model.comm.counter.overlapped == cfg.tp_block_repetition * len(cfg.delayed_sends)


@pytest.mark.parametrize("flavor", RECIPES)
def test_compiled_model_does_not_recompile_every_step(flavor):
    """torch.compile must trace a model once: the sync counter's Python side effect used to be guarded, so each
    step recompiled until Dynamo gave up and ran eager. Dynamo's "eager" backend keeps the test fast."""
    import torch._dynamo

    torch._dynamo.reset()
    model = build_model(get_flavor(flavor))
    compiled = torch.compile(model, backend="eager")
    tokens = torch.randint(0, 256, (2, 12))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            out = compiled(tokens)
            out.sum().backward()
    torch.testing.assert_close(out, model(tokens))
    assert sum(model.comm.counter.by_kind.values()) > 0  # eager calls are still counted


# ---------------------------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(recipe="sandwich", lane_count=3), "lane_count"),
        (dict(recipe="sandwich", lane_count=4, lane_n_heads=3), "lane_n_heads"),
        (dict(lane_depth=0), "lane_depth"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(lane_n_kv_heads=2, lane_n_heads=2, lane_count=4, recipe="sandwich", hidden_size=32), None),
        (dict(tp_block_repetition=0), "tp_block_repetition"),
        (dict(recipe="club"), "recipe"),
        (dict(delayed_comm=True, lane_count=1, lane_n_heads=4, lane_n_kv_heads=2), "lane_count"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    if field is None:  # a valid corner case: lane KV heads == lane heads
        tp_cfg(**changes)
        return
    with pytest.raises(ValueError, match=field):
        tp_cfg(**changes)


def test_unknown_flavor_lists_known_ones():
    with pytest.raises(ValueError, match="debug_burger"):
        get_flavor("burger_9000")
