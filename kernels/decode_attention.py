"""Lane-batched one-token decode attention over a KV cache: GQA, RoPE on the query, flash-decoding split.

Four parts: ``@triton.jit`` kernels (a split kernel and a reduction kernel), the launcher, the torch custom op
``tpblocks::decode_attention`` (fake + autograd registration), and ``reference`` (pure torch, the CPU path).

Layout matches ``tpblocks.models.kv_cache.KVCache``: lanes are folded into the batch axis, so B = l*b and
all lanes of a device decode in one launch. Shapes: q (B, n, e) for the one new token; k/v cache
(B, k, T_max, e) of which the first ``seq_len`` positions are valid; n = k * group (GQA).

RoPE: the query is rotated in the kernel, in the model's ``RotaryEmbedding`` form
``q * cos + roll(q, e/2) * sin_signed`` (the rotate-half layout), from its ``cos``/``sin_signed`` rows (e,) at the
current position. The cached keys are assumed **already rotated**, which is
what the model stores (it rotates k before ``KVCache.update``): rotating the whole cache every step would
redo work. Pass ``cos=sin=None`` for a query that is already rotated.

Flash decoding (Dao et al., 2023): one program per (sequence, KV head, split of the positions) computes a
partial softmax (running max m, sum l, weighted values) for the whole group of query heads sharing that KV
head, so each key is read once per group; a second kernel combines the splits. Prefill keeps torch SDPA.

The backward (decode is inference, but the op is differentiable for completeness) is closed-form torch math.
"""

import math

import torch

from ._triton import cdiv, interpreting, next_pow2, require_launchable, tl, triton

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(
    Q,  # (B, n, e) query of the new token
    K,  # (B, kh, >= seq_len, e) key cache, rotated; any strides with a contiguous last dim
    V,  # (B, kh, >= seq_len, e) value cache, same strides as K
    COS,  # (e,) RoPE cos row at the current position (unused unless APPLY_ROPE)
    SIN,  # (e,) RoPE signed sin row [-sin, sin] (the model's ``sin_signed``)
    O_PART,  # (B, n, n_splits, e) fp32 un-normalised partial outputs
    M_PART,  # (B, n, n_splits) fp32 running max of the scores
    L_PART,  # (B, n, n_splits) fp32 sum of exp(score - m)
    n_heads,
    n_kv_heads,
    group,  # query heads per KV head
    stride_kv_b,  # K/V strides (elements) of the sequence, head and position axes: a view of the
    stride_kv_h,  # model's preallocated cache (``KVCache.update`` returns [:, :, :end]) is read in place
    stride_kv_t,
    seq_len,  # valid positions
    head_dim,
    split_len,  # positions per split, a multiple of BLOCK_T
    n_splits,
    scale,  # 1/sqrt(e)
    APPLY_ROPE: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= group
    BLOCK_T: tl.constexpr,  # positions per inner step
    BLOCK_E: tl.constexpr,  # >= head_dim
):
    bk = tl.program_id(0)  # (sequence, KV head)
    split = tl.program_id(1)
    b = bk // n_kv_heads
    kvh = bk % n_kv_heads
    hs = kvh * group + tl.arange(0, BLOCK_G)  # query heads of this group
    es = tl.arange(0, BLOCK_E)
    h_ok = tl.arange(0, BLOCK_G) < group
    e_ok = es < head_dim
    q_base = Q + b.to(tl.int64) * n_heads * head_dim
    q_mask = h_ok[:, None] & e_ok[None, :]
    q = tl.load(q_base + hs[:, None] * head_dim + es[None, :], mask=q_mask, other=0.0).to(tl.float32)
    if APPLY_ROPE:
        half = head_dim // 2
        partner = tl.where(es < half, es + half, es - half)  # roll by e/2
        q_partner = tl.load(q_base + hs[:, None] * head_dim + partner[None, :], mask=q_mask, other=0.0)
        cos = tl.load(COS + es, mask=e_ok, other=0.0).to(tl.float32)
        sin = tl.load(SIN + es, mask=e_ok, other=0.0).to(tl.float32)
        q = q * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]
        q = q.to(Q.dtype.element_ty).to(tl.float32)  # the reference rotates in the query's dtype
    q = q * scale

    kv_base = b.to(tl.int64) * stride_kv_b + kvh.to(tl.int64) * stride_kv_h
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_E), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    for t0 in range(start, end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < end
        kv_offs = kv_base + ts[:, None].to(tl.int64) * stride_kv_t + es[None, :]
        kv_mask = t_ok[:, None] & e_ok[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        # (G, T) scores by broadcast-multiply-reduce: the group is small (often 1-8), below tl.dot's 16 minimum.
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    part = (b.to(tl.int64) * n_heads + hs) * n_splits + split
    tl.store(O_PART + part[:, None] * head_dim + es[None, :], acc, mask=q_mask)
    tl.store(M_PART + part, m, mask=h_ok)
    tl.store(L_PART + part, l_sum, mask=h_ok)


@triton.jit
def _decode_reduce_kernel(
    O_PART,  # (B, n, n_splits, e)
    M_PART,  # (B, n, n_splits)
    L_PART,  # (B, n, n_splits)
    O,  # (B, n, e) output, in the query dtype
    head_dim,
    n_splits,
    BLOCK_S: tl.constexpr,  # >= n_splits
    BLOCK_E: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    ss = tl.arange(0, BLOCK_S)
    es = tl.arange(0, BLOCK_E)
    s_ok = ss < n_splits
    e_ok = es < head_dim
    m = tl.load(M_PART + bh * n_splits + ss, mask=s_ok, other=float("-inf"))
    l_sum = tl.load(L_PART + bh * n_splits + ss, mask=s_ok, other=0.0)
    o = tl.load(O_PART + (bh * n_splits + ss[:, None]) * head_dim + es[None, :], mask=s_ok[:, None] & e_ok[None, :],
                other=0.0)  # fmt: skip
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - m_max)  # empty splits have m = -inf -> weight 0
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(O + bh * head_dim + es, out, mask=e_ok)


# ----------------------------------------------------------------------------------------------- launcher


def _check(q, k_cache, v_cache, seq_len, cos, sin) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q (B, n, e) and k/v caches (B, k, T, e); got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")  # fmt: skip
    bq, n, e = q.shape
    b, kh, t_max, e2 = k_cache.shape
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k and v caches must share strides, with a contiguous head dim")
    if bq != b or e != e2 or n % kh:
        raise ValueError(f"q {tuple(q.shape)} and cache {tuple(k_cache.shape)} disagree (n must be a multiple of k)")
    if not 1 <= seq_len <= t_max:
        raise ValueError(f"seq_len={seq_len} must be in [1, {t_max}] (the cache capacity)")
    if (cos is None) != (sin is None) or (cos is not None and (cos.shape != (e,) or sin.shape != (e,))):
        raise ValueError(f"cos and sin must both be None or both ({e},)")
    if cos is not None and e % 2:
        raise ValueError(f"RoPE needs an even head dim, got {e}")


def _auto_splits(seq_len: int, n_programs: int, block_t: int, device: torch.device) -> int:
    if interpreting():
        return max(1, min(4, cdiv(seq_len, 256)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    # Enough programs for ~2 waves over the SMs, never a split shorter than one inner block.
    return max(1, min(cdiv(seq_len, block_t), cdiv(2 * sms, max(1, n_programs))))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Launch split + reduce. ``num_splits=0`` picks the split count from the device."""
    require_launchable(q)
    _check(q, k_cache, v_cache, seq_len, cos, sin)
    b, n, e = q.shape
    kh = k_cache.shape[1]
    group = n // kh
    q = q.contiguous()
    block_g, block_e = max(2, next_pow2(group)), next_pow2(e)
    # The (G, T, E) broadcast product lives in registers: on a GPU keep it near 8k fp32 values per program.
    block_t = 64 if interpreting() else max(8, min(64, 8192 // (block_g * block_e)))
    splits = num_splits or _auto_splits(seq_len, b * kh, block_t, q.device)
    split_len = cdiv(cdiv(seq_len, splits), block_t) * block_t
    splits = cdiv(seq_len, split_len)
    o_part = torch.empty(b, n, splits, e, dtype=torch.float32, device=q.device)
    m_part = torch.empty(b, n, splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b, n, splits, dtype=torch.float32, device=q.device)
    rope = cos is not None
    _decode_split_kernel[(b * kh, splits)](
        q, k_cache, v_cache, cos.contiguous() if rope else q, sin.contiguous() if rope else q,
        o_part, m_part, l_part, n, kh, group, *k_cache.stride()[:3], seq_len, e, split_len, splits,
        1.0 / math.sqrt(e),
        APPLY_ROPE=rope, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    out = torch.empty_like(q)
    _decode_reduce_kernel[(b * n,)](
        o_part, m_part, l_part, out, e, splits, BLOCK_S=max(2, next_pow2(splits)), BLOCK_E=next_pow2(e)
    )
    return out


# ----------------------------------------------------------------------------------------------- custom op


@torch.library.custom_op("tpblocks::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: int,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_splits: int,
) -> torch.Tensor:
    """Attention of one query token per sequence over the first ``seq_len`` cached positions."""
    return decode_attention_triton(q, k_cache, v_cache, seq_len, cos, sin, num_splits)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, seq_len, cos, sin, num_splits):
    return torch.empty_like(q)


def _setup(ctx, inputs, output):
    q, k_cache, v_cache, seq_len, cos, sin, _ = inputs
    ctx.seq_len = seq_len
    ctx.save_for_backward(q, k_cache, v_cache, cos, sin)


def _rotate(q: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The model's RoPE: ``q * cos + roll(q, e/2) * sin_signed`` in q's dtype."""
    return q * cos.to(q.dtype) + q.roll(q.shape[-1] // 2, dims=-1) * sin_signed.to(q.dtype)


def _backward(ctx, do):
    q, k_cache, v_cache, cos, sin = ctx.saved_tensors
    t = ctx.seq_len
    b, n, e = q.shape
    kh = k_cache.shape[1]
    g = n // kh
    qr = q if cos is None else _rotate(q, cos, sin)
    qr_bkge = qr.float().view(b, kh, g, e)
    k = k_cache[:, :, :t].float()
    v = v_cache[:, :, :t].float()
    do_bkge = do.float().view(b, kh, g, e)
    scale = 1.0 / math.sqrt(e)
    p = torch.softmax(torch.einsum("bkge,bkte->bkgt", qr_bkge, k) * scale, dim=-1)
    dv = torch.einsum("bkgt,bkge->bkte", p, do_bkge)
    dp = torch.einsum("bkge,bkte->bkgt", do_bkge, v)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    dqr = torch.einsum("bkgt,bkte->bkge", ds, k).reshape(b, n, e)
    dk = torch.einsum("bkgt,bkge->bkte", ds, qr_bkge)
    if cos is not None:  # transpose of q -> q*cos + roll(q, e/2)*sin; roll by e/2 is its own inverse
        dqr = dqr * cos.float() + (dqr * sin.float()).roll(e // 2, dims=-1)
    dk_cache = torch.zeros_like(k_cache)
    dv_cache = torch.zeros_like(v_cache)
    dk_cache[:, :, :t] = dk.to(k_cache.dtype)
    dv_cache[:, :, :t] = dv.to(v_cache.dtype)
    return dqr.to(q.dtype), dk_cache, dv_cache, None, None, None, None


decode_attention_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------- reference


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure torch, the model's path: rotate q as ``RotaryEmbedding`` does, then SDPA over the valid cache."""
    _check(q, k_cache, v_cache, seq_len, cos, sin)
    if cos is not None:
        q = _rotate(q, cos, sin)
    k, v = k_cache[:, :, :seq_len], v_cache[:, :, :seq_len]
    gqa = q.shape[1] != k.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=gqa)
    return o.squeeze(2)
