"""Lane-batched decode attention (GQA, RoPE on q, flash-decoding split): Triton (interpreter) vs reference/model."""

from __future__ import annotations

import pytest
import torch

from kernels import decode_attention as K
from tpblocks.models.kv_cache import KVCache
from tpblocks.models.layers import RotaryEmbedding, attend

# (B = lanes*batch, query heads, KV heads, head dim, cache capacity, valid length, splits; 0 = auto)
CASES = [
    (3, 4, 2, 16, 300, 123, 0),  # GQA 2:1, odd length, auto split
    (2, 6, 1, 8, 130, 130, 3),  # MQA, full cache, forced 3-way split (exercises the reduction)
    (1, 2, 2, 16, 40, 1, 0),  # one position
    (2, 3, 3, 12, 70, 65, 2),  # no GQA, head dim not a power of two
]


def _grads(out, inputs):
    upstream = torch.linspace(-1, 1, out.numel()).view(out.shape)
    return torch.autograd.grad((out.float() * upstream).sum(), inputs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("dtype", "rope"), [(torch.float32, True), (torch.float32, False), (torch.float16, True)])
def test_matches_reference(case, dtype, rope, close):
    b, n, kh, e, t_max, t, splits = case
    q = torch.randn(b, n, e, dtype=dtype, requires_grad=True)
    k = torch.randn(b, kh, t_max, e, dtype=dtype, requires_grad=True)
    v = torch.randn(b, kh, t_max, e, dtype=dtype, requires_grad=True)
    cos = sin = None
    if rope:
        table = RotaryEmbedding(e, t_max)
        cos, sin = table.cos[t - 1], table.sin_signed[t - 1]
    o = K.decode_attention_op(q, k, v, t, cos, sin, splits)
    o_ref = K.reference(q, k, v, t, cos, sin)
    close(o, o_ref, dtype)
    for a, r in zip(_grads(o, (q, k, v)), _grads(o_ref, (q, k, v))):
        close(a, r, dtype)


def test_one_decode_step_matches_the_model():
    """Prefill 9 tokens through the model's attend() + KVCache, then decode token 10 both ways."""
    torch.manual_seed(1)
    b, n, kh, e, prefix = 4, 4, 2, 16, 9
    rope = RotaryEmbedding(e, 32)
    cache = KVCache(1, 32)
    q_pre, k_pre, v_pre = torch.randn(b, n, prefix, e), torch.randn(b, kh, prefix, e), torch.randn(b, kh, prefix, e)
    attend(rope(q_pre, 0), rope(k_pre, 0), v_pre, cache, 0)
    cache.advance(prefix)
    q, k_new, v_new = torch.randn(b, n, 1, e), torch.randn(b, kh, 1, e), torch.randn(b, kh, 1, e)
    o_model = attend(rope(q, prefix), rope(k_new, prefix), v_new, cache, 0).squeeze(2)
    k_cache, v_cache = cache._k[0], cache._v[0]  # the model wrote the rotated new key at position `prefix`
    o = K.decode_attention_op(q.squeeze(2), k_cache, v_cache, prefix + 1, rope.cos[prefix], rope.sin_signed[prefix], 0)
    torch.testing.assert_close(o, o_model, atol=1e-5, rtol=1e-5)
    # The strided view KVCache.update returns ([:, :, :end] of the preallocated buffer) is read in place.
    view_k, view_v = k_cache[:, :, : prefix + 1], v_cache[:, :, : prefix + 1]
    o_view = K.decode_attention_op(
        q.squeeze(2), view_k, view_v, prefix + 1, rope.cos[prefix], rope.sin_signed[prefix], 0
    )
    assert torch.equal(o_view, o)


def test_stale_cache_positions_are_ignored():
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 64, 8), torch.randn(2, 1, 64, 8)
    o = K.decode_attention_op(q, k, v, 10, None, None, 0)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:] = 1e4  # garbage beyond seq_len must not leak in
    v2[:, :, 10:] = float("nan")
    assert torch.equal(o, K.decode_attention_op(q, k2, v2, 10, None, None, 0))


def test_opcheck():
    q = torch.randn(1, 2, 8, requires_grad=True)
    k = torch.randn(1, 1, 12, 8, requires_grad=True)
    v = torch.randn(1, 1, 12, 8, requires_grad=True)
    table = RotaryEmbedding(8, 12)
    torch.library.opcheck(K.decode_attention_op, (q, k, v, 7, table.cos[6], table.sin_signed[6], 2))


def test_bad_arguments_are_explained():
    q, k = torch.randn(2, 3, 8), torch.randn(2, 2, 20, 8)
    with pytest.raises(ValueError, match="multiple"):
        K.decode_attention_triton(q, k, k, 5)
    with pytest.raises(ValueError, match="seq_len"):
        K.decode_attention_triton(torch.randn(2, 4, 8), k, k, 21)
