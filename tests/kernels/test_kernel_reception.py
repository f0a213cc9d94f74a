"""Delayed-reception op (sum / mean / gated): Triton (interpreter) vs the model's Reception, every gradient."""

from __future__ import annotations

import pytest
import torch

from kernels import reception as K
from tpblocks.models.delayed import Reception

# (lanes here, batch, seq, width, lanes in the block): odd rows and width. Also the GPU check's (benchmarks/gpu).
RECEPTION_SHAPE = (3, 5, 41, 123, 4)


def _case(mode, dtype, l=3, b=5, s=41, d=123, lane_count=4):
    x = torch.randn(l, b, s, d, dtype=dtype, requires_grad=True)
    total = torch.randn(b, s, d, dtype=dtype, requires_grad=True)
    sent = torch.randn(l, b, s, d, dtype=dtype, requires_grad=True)
    rec = Reception(mode, l, d, 2, lane_count, 1e-5)
    if rec.gate is not None:
        with torch.no_grad():
            rec.gate.normal_()  # the model zero-inits the gate; a zero gate would hide the gated term
    return x, total, sent, rec


def _grads(out, inputs):
    upstream = torch.linspace(-1, 1, out.numel()).view(out.shape)
    return torch.autograd.grad((out.float() * upstream).sum(), inputs)


@pytest.mark.parametrize("mode", ["sum", "mean", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_model_reception(mode, dtype, close):
    x, total, sent, rec = _case(mode, dtype, *RECEPTION_SHAPE)
    point = 1
    gate = rec.gate[point] if rec.gate is not None else None
    y = K.reception_triton(x, total, sent, gate, mode, rec.lane_count, rec.eps)
    y_model = rec(x, total, sent, point)
    assert y.dtype == y_model.dtype
    close(y, y_model, dtype)
    inputs = (x, total, sent) + ((rec.gate,) if gate is not None else ())
    for a, r in zip(_grads(y, inputs), _grads(y_model, inputs)):
        # total's and the gate's gradients sum over lanes / rows: scale the absolute tolerance.
        close(a, r, dtype, scale=10.0 if a.dim() != 4 else 1.0)


@pytest.mark.parametrize("mode", ["sum", "gated"])
def test_reference_is_the_model_path(mode):
    x, total, sent, rec = _case(mode, torch.float32, l=2, b=2, s=3, d=16)
    gate = rec.gate[0] if rec.gate is not None else None
    torch.testing.assert_close(K.reference(x, total, sent, gate, mode, 4, 1e-5), rec(x, total, sent, 0))


def test_a_wrong_peer_count_is_detected(close):
    x, total, sent, rec = _case("mean", torch.float32, l=2, b=2, s=3, d=16)
    y = K.reception_triton(x, total, sent, None, "mean", 5, 1e-5)  # pretends 5 lanes in the block, model has 4
    with pytest.raises(AssertionError):
        close(y, rec(x, total, sent, 0), torch.float32)


def test_opcheck():
    x, total, sent, rec = _case("gated", torch.float32, l=2, b=1, s=3, d=8)
    torch.library.opcheck(K.reception_op, (x, total, sent, rec.gate[0].detach().requires_grad_(), "gated", 4, 1e-5))
    torch.library.opcheck(K.reception_op, (x, total, sent, None, "mean", 4, 1e-5))
    gate = rec.gate[0].detach()
    _, rstd = K.reception_op(x.detach(), total.detach(), sent.detach(), gate, "gated", 4, 1e-5)
    dy = torch.randn(x.shape)
    torch.library.opcheck(K.reception_bwd_op, (dy, total.detach(), sent.detach(), gate, rstd, "gated", 4))


def test_bad_arguments_are_explained():
    x, total, sent, _ = _case("sum", torch.float32, l=2, b=1, s=2, d=8)
    with pytest.raises(ValueError, match="comm_reception"):
        K.reception_fwd_triton(x, total, sent, None, "max", 4, 1e-5)
    with pytest.raises(ValueError, match="gate"):
        K.reception_fwd_triton(x, total, sent, None, "gated", 4, 1e-5)
    with pytest.raises(ValueError, match="lane_count"):
        K.reception_fwd_triton(x, total, sent, None, "sum", 1, 1e-5)
