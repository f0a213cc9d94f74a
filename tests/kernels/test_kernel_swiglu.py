"""SwiGLU activation and the Burger slice-write down-projection: Triton (interpreter) vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels import swiglu as K
from tpblocks.models.lanes import add_into_own_slice, lane_matmul


def _grads(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    upstream = torch.linspace(-2, 2, out.numel()).view(out.shape)
    return list(torch.autograd.grad((out.float() * upstream).sum(), inputs))


SWIGLU_SHAPES = [(5, 123, 123), (3, 1, 7)]  # odd sizes; also the GPU check's small shapes (benchmarks/gpu)


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_swiglu_matches_reference(shape, dtype, close):
    g = (2 * torch.randn(shape)).to(dtype).requires_grad_(True)
    u = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = K.swiglu_op(g, u)
    y_ref = K.swiglu_reference(g, u)
    close(y, y_ref, dtype)
    for a, b in zip(_grads(y, (g, u)), _grads(y_ref, (g, u))):
        close(a, b, dtype)


# (lanes, batch, seq, d, f, c, lane_offset): Burger slices of a 4-lane block held 2 + 2, odd f and rows.
SLICE_CASES = [(2, 2, 7, 20, 13, 5, 2), (4, 1, 9, 36, 50, 9, 0), (1, 3, 5, 12, 7, 3, 3)]


@pytest.mark.parametrize("case", SLICE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slice_write_matches_model(case, dtype, close):
    l, b, s, d, f, c, off = case
    x = torch.randn(l, b, s, d, dtype=dtype, requires_grad=True)
    act = torch.randn(l, b, s, f, dtype=dtype, requires_grad=True)
    w = (torch.randn(l, f, c) / f**0.5).to(dtype).requires_grad_(True)
    y = K.lane_down_into_own_slice_op(x, act, w, off)
    y_model = add_into_own_slice(x, lane_matmul(act, w), off)
    close(y, y_model, dtype)
    # Only each lane's own slice changed; everything else is x, bit for bit.
    changed = (y != x).any(dim=(1, 2))  # (l, d)
    for lane in range(l):
        own = torch.zeros(d, dtype=torch.bool)
        own[(off + lane) * c : (off + lane + 1) * c] = True
        assert not changed[lane, ~own].any()
    for a, r in zip(_grads(y, (x, act, w)), _grads(y_model, (x, act, w))):
        close(a, r, dtype)


def test_reference_is_the_model_path():
    x, act, w = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 6), torch.randn(2, 6, 4)
    assert torch.equal(
        K.lane_down_into_own_slice_reference(x, act, w, 1), add_into_own_slice(x, lane_matmul(act, w), 1)
    )


def test_a_wrong_lane_offset_is_detected(close):
    x, act, w = torch.randn(2, 1, 3, 16), torch.randn(2, 1, 3, 6), torch.randn(2, 6, 4)
    y = K.lane_down_into_own_slice_op(x, act, w, 1)
    with pytest.raises(AssertionError):
        close(y, add_into_own_slice(x, lane_matmul(act, w), 2), torch.float32)


def test_opcheck():
    g, u = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    torch.library.opcheck(K.swiglu_op, (g, u))
    torch.library.opcheck(K.swiglu_bwd_op, (torch.randn(3, 5), g.detach(), u.detach()))
    x = torch.randn(2, 1, 3, 8, requires_grad=True)
    act = torch.randn(2, 1, 3, 5, requires_grad=True)
    w = torch.randn(2, 5, 4, requires_grad=True)
    torch.library.opcheck(K.lane_down_into_own_slice_op, (x, act, w, 0))


def test_bad_slice_layout_is_explained():
    x, act = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 5)
    with pytest.raises(ValueError, match="slices"):
        K.lane_down_into_own_slice_triton(x, act, torch.randn(2, 5, 4), 1)  # lanes 1..2 of 2 slices
    with pytest.raises(ValueError, match="disagree"):
        K.lane_down_into_own_slice_triton(x, act, torch.randn(3, 5, 4), 0)
    with pytest.raises(ValueError, match="one dtype"):
        K.lane_down_into_own_slice_triton(x, act.bfloat16(), torch.randn(2, 5, 4), 0)
