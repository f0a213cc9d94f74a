"""The public entry points: each op runs its Triton custom op or its pure-torch reference, per ``dispatch``.

``tpblocks.models`` calls these (behind ``dispatch.use_triton``) so that on CUDA the fused kernels run and on
the CPU the model's own reference math runs unchanged. All ops are differentiable either way.

Shape legend: l lanes on this device, b batch, s sequence, d lane width, f FFN size, c slice width (h/L),
B = l*b sequences (lanes folded into the batch), n/k query/KV heads, e head dim, T cache capacity.
"""

from __future__ import annotations

import torch

from . import decode_attention as _attn
from . import reception as _rec
from . import rms_norm as _norm
from . import swiglu as _swiglu
from .dispatch import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)``; ``weight`` is (d,) or per lane (l, 1, ..., 1, d) for ``x`` (l, ..., d)."""
    if use_triton(x) and _norm.group_weight(x, weight) is not None:
        return _norm.rms_norm_triton(x, weight, eps)
    weight_gd = _norm.group_weight(x, weight)
    if weight_gd is None:  # a broadcast the kernel does not cover: plain torch
        return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return _norm.reference(x, weight_gd, eps)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (the SwiGLU activation of all lanes, any shape)."""
    if use_triton(g):
        return _swiglu.swiglu_op(g, u)
    return _swiglu.swiglu_reference(g, u)


def lane_down_into_own_slice(
    x_lbsd: torch.Tensor, act_lbsf: torch.Tensor, w_down_lfc: torch.Tensor, lane_offset: int
) -> torch.Tensor:
    """Burger FFN write: ``x`` with ``act[l] @ w_down[l]`` added into feature slice ``lane_offset + l`` of lane l."""
    if use_triton(x_lbsd):
        device = x_lbsd.device.type
        if torch.is_autocast_enabled(device):  # as autocast casts the reference's bmm; x (the residual) keeps its dtype
            dtype = torch.get_autocast_dtype(device)
            act_lbsf, w_down_lfc = act_lbsf.to(dtype), w_down_lfc.to(dtype)
        return _swiglu.lane_down_into_own_slice_op(x_lbsd, act_lbsf, w_down_lfc, int(lane_offset))
    return _swiglu.lane_down_into_own_slice_reference(x_lbsd, act_lbsf, w_down_lfc, lane_offset)


def decode_attention(
    q_bne: torch.Tensor,
    k_cache_bkte: torch.Tensor,
    v_cache_bkte: torch.Tensor,
    seq_len: int,
    cos_e: torch.Tensor | None = None,
    sin_signed_e: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """One-token GQA attention over the first ``seq_len`` cached (pre-rotated) keys; q rotated here if cos given."""
    if use_triton(q_bne):
        return _attn.decode_attention_op(q_bne, k_cache_bkte, v_cache_bkte, int(seq_len), cos_e, sin_signed_e,
                                         int(num_splits))  # fmt: skip
    return _attn.reference(q_bne, k_cache_bkte, v_cache_bkte, seq_len, cos_e, sin_signed_e)


def reception(
    x_lbsd: torch.Tensor,
    total_bsd: torch.Tensor,
    sent_lbsd: torch.Tensor,
    gate_ld: torch.Tensor | None,
    mode: str,
    lane_count: int,
    eps: float,
) -> torch.Tensor:
    """Delayed reception ``x + [gate *] f(total - sent)`` (``tpblocks.models.delayed`` modes) in one pass."""
    if use_triton(x_lbsd):
        return _rec.reception_triton(x_lbsd, total_bsd, sent_lbsd, gate_ld, mode, lane_count, eps)
    return _rec.reference(x_lbsd, total_bsd, sent_lbsd, gate_ld if mode == "gated" else None, mode, lane_count, eps)
