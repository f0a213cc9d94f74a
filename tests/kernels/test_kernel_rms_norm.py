"""RMSNorm: Triton (interpreter) vs reference, output and every gradient, odd shapes."""

from __future__ import annotations

import pytest
import torch

from kernels import rms_norm as K
from tpblocks.models.layers import rms_norm as model_rms_norm

SHAPES = [(5, 123, 123), (2, 3, 37, 64), (1, 1, 1, 8)]  # odd rows/cols; one row; lanes (2) x (3*37) rows


def _inputs(shape, dtype, lanes: bool):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    if lanes:  # one weight per leading index, broadcast like the model's norm_ld[:, None, None, :]
        w_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    else:
        w_shape = (shape[-1],)
    w = (1.0 + 0.5 * torch.randn(w_shape)).requires_grad_(True)  # fp32 weights, as the models keep them
    return x, w


def _run(fn, x, w):
    y = fn(x, w)
    upstream = torch.linspace(-1, 1, y.numel()).view(y.shape)  # uneven: a mixed-up gradient row is caught
    (y.float() * upstream).sum().backward()
    grads = [t.grad.clone() for t in (x, w)]
    x.grad = w.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_backward_match_reference(shape, dtype, close):
    lanes = len(shape) == 4
    x, w = _inputs(shape, dtype, lanes)
    eps = 1e-5
    y, grads = _run(lambda a, c: K.rms_norm_triton(a, c, eps), x, w)
    y_ref, grads_ref = _run(lambda a, c: K.reference(a, K.group_weight(a, c), eps), x, w)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    close(y, y_ref, dtype)
    n_rows = x.numel() // shape[-1]
    for g, g_ref in zip(grads, grads_ref):
        # The weight gradient sums over rows: its absolute error grows with the row count.
        close(g, g_ref, dtype, scale=max(1.0, n_rows**0.5) if g.shape == w.shape else 1.0)


def test_reference_is_the_model_math():
    x = torch.randn(3, 5, 7, 24)
    w = torch.randn(3, 1, 1, 24)
    y_ref = K.reference(x, K.group_weight(x, w), 1e-5)
    torch.testing.assert_close(y_ref, model_rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-6)
    w1 = torch.randn(24)
    torch.testing.assert_close(K.reference(x, w1.view(1, 24), 1e-5), model_rms_norm(x, w1, 1e-5))


def test_a_wrong_weight_grouping_is_detected(close):
    """The comparison can fail: lane weights applied to the wrong lanes give a different output."""
    x = torch.randn(2, 3, 4, 16)
    w = torch.randn(2, 1, 1, 16)
    y = K.rms_norm_triton(x, w, 1e-5)
    y_swapped = K.reference(x, K.group_weight(x, w).flip(0), 1e-5)
    with pytest.raises(AssertionError):
        close(y, y_swapped, torch.float32)


def test_opcheck():
    x = torch.randn(2, 5, 12, requires_grad=True)
    w = torch.randn(2, 12, requires_grad=True)
    torch.library.opcheck(K.rms_norm_op, (x, w, 1e-5))
    torch.library.opcheck(K.rms_norm_op, (x, w[:1], 1e-5))
    _, rstd = K.rms_norm_op(x.detach(), w.detach(), 1e-5)
    torch.library.opcheck(K.rms_norm_bwd_op, (torch.randn_like(x), x.detach(), w.detach(), rstd))


def test_bad_weight_shape_is_explained():
    x = torch.randn(4, 6, 8)
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm_triton(x, torch.ones(4, 6, 8), 1e-5)
    with pytest.raises(ValueError, match="groups"):
        K.rms_norm_fwd_triton(x, torch.ones(5, 8), 1e-5)
