"""Delayed-communication reception in one pass: ``y = x + gate * rmsnorm((total - sent) / (L - 1))``.

Four parts: the ``@triton.jit`` forward and backward kernels, launchers, the torch custom ops
``tpblocks::reception`` / ``tpblocks::reception_bwd`` (fake + autograd registration), and ``reference``
(pure torch, the CPU path).

Semantics are ``tpblocks.models.delayed.Reception`` (modes "sum", "mean", "gated"): ``total_bsd`` is the
all-reduced sum of every lane's broadcast, ``sent_lbsd`` what each local lane sent, so ``total - sent`` is the
sum over the *other* lanes. Unfused, "gated" reads/writes the (l, b, s, d) state about seven times (subtract,
divide, norm, cast, scale, add); here every input is read once and the output written once. One program owns
a tile of (b*s) rows and loops over the local lanes, so ``total`` is read once per tile and, in the backward,
its gradient (a sum over lanes) is accumulated in registers instead of a second reduction pass.
"""

import torch
import torch.nn.functional as F

from ._triton import cdiv, next_pow2, num_warps_for, require_launchable, rows_per_program, tl, triton

MODES = {"sum": 0, "mean": 1, "gated": 2}

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _others(TOTAL, SENT, t_offs, s_offs, mask, inv_peers, MODE: tl.constexpr, DTYPE: tl.constexpr):
    """Sum (MODE 0) or mean (MODE >= 1) over the other lanes, rounded to the storage dtype like the reference."""
    total = tl.load(TOTAL + t_offs, mask=mask, other=0.0).to(tl.float32)
    sent = tl.load(SENT + s_offs, mask=mask, other=0.0).to(tl.float32)
    o = (total - sent).to(DTYPE).to(tl.float32)
    if MODE >= 1:
        o = (o * inv_peers).to(DTYPE).to(tl.float32)
    return o


@triton.jit
def _reception_fwd_kernel(
    X,  # (l, M, d) lane states after the layer, M = b*s
    TOTAL,  # (M, d) sum over all lanes of what they sent
    SENT,  # (l, M, d) what each local lane sent
    GATE,  # (l, d) reception gate of this send point (unused unless MODE == 2)
    Y,  # (l, M, d) output, dtype = promote(x, gate)
    RSTD,  # (l, M) fp32 1/rms of the received mean (written only in MODE == 2)
    n_lanes,
    M,
    d,
    inv_peers,  # 1 / (lane_count - 1)
    eps,
    MODE: tl.constexpr,  # 0 sum, 1 mean, 2 gated
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    t_offs = rows[:, None].to(tl.int64) * d + cols[None, :]
    for lane in range(n_lanes):
        offs = lane * M * d + t_offs
        o = _others(TOTAL, SENT, t_offs, offs, mask, inv_peers, MODE, X.dtype.element_ty)
        if MODE == 2:
            rstd = tl.rsqrt(tl.sum(o * o, axis=1) / d + eps)
            normed = (o * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
            gate = tl.load(GATE + lane * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            o = (gate[None, :] * normed).to(Y.dtype.element_ty).to(tl.float32)
            tl.store(RSTD + lane * M + rows, rstd, mask=row_ok)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, x + o, mask=mask)


@triton.jit
def _reception_bwd_kernel(
    DY,  # (l, M, d) gradient of y (also the gradient of x, returned as is)
    TOTAL,
    SENT,
    GATE,
    RSTD,
    DTOTAL,  # (M, d) gradient of total: sum over local lanes
    DSENT,  # (l, M, d) gradient of sent
    DGATE_PART,  # (l, n_blocks, d) fp32 partial gate gradients
    n_lanes,
    M,
    d,
    n_blocks,
    inv_peers,
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    t_offs = rows[:, None].to(tl.int64) * d + cols[None, :]
    dtotal = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for lane in range(n_lanes):
        offs = lane * M * d + t_offs
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 2:
            o = _others(TOTAL, SENT, t_offs, offs, mask, inv_peers, MODE, SENT.dtype.element_ty)
            rstd = tl.load(RSTD + lane * M + rows, mask=row_ok, other=0.0)
            gate = tl.load(GATE + lane * d + cols, mask=col_ok, other=0.0).to(tl.float32)
            nhat = o * rstd[:, None]
            dgate = tl.sum(dy * nhat.to(SENT.dtype.element_ty).to(tl.float32), axis=0)
            tl.store(DGATE_PART + (lane * n_blocks + block) * d + cols, dgate, mask=col_ok)
            g = dy * gate[None, :]
            c = tl.sum(g * nhat, axis=1) / d
            do = (g - nhat * c[:, None]) * rstd[:, None] * inv_peers
        elif MODE == 1:
            do = dy * inv_peers
        else:
            do = dy
        tl.store(DSENT + offs, -do, mask=mask)
        dtotal += do
    tl.store(DTOTAL + t_offs, dtotal, mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def _check(x, total, sent, gate, mode: str, lane_count: int) -> None:
    if mode not in MODES:
        raise ValueError(f"comm_reception={mode!r} is not one of {', '.join(MODES)}")
    if x.dim() != 4 or sent.shape != x.shape or total.shape != x.shape[1:]:
        raise ValueError(f"expected x/sent (l, b, s, d) and total (b, s, d); got {tuple(x.shape)}, "
                         f"{tuple(sent.shape)}, {tuple(total.shape)}")  # fmt: skip
    if lane_count < 2:
        raise ValueError(f"delayed reception needs lane_count >= 2, got {lane_count}")
    if (mode == "gated") != (gate is not None):
        raise ValueError("mode 'gated' needs a gate (l, d); the other modes take none")
    if gate is not None and gate.shape != (x.shape[0], x.shape[-1]):
        raise ValueError(f"gate must be (l, d) = {(x.shape[0], x.shape[-1])}, got {tuple(gate.shape)}")


def _out_dtype(x: torch.Tensor, gate: torch.Tensor | None) -> torch.dtype:
    return torch.result_type(x, gate) if gate is not None else x.dtype


def _launch_shape(m: int, d: int) -> tuple[int, int, int]:
    block_d = next_pow2(d)
    block_r = rows_per_program(m, block_d)
    return block_r, block_d, cdiv(m, block_r)


def reception_fwd_triton(x, total, sent, gate, mode: str, lane_count: int, eps: float):
    """Returns (y, rstd); ``rstd`` is (l, b, s) fp32 for "gated", empty otherwise."""
    require_launchable(x)
    _check(x, total, sent, gate, mode, lane_count)
    l, b, s, d = x.shape
    m = b * s
    x, total, sent = x.contiguous(), total.contiguous(), sent.contiguous()
    gated = gate is not None
    y = torch.empty(x.shape, dtype=_out_dtype(x, gate), device=x.device)
    rstd = torch.empty((l, b, s) if gated else (0,), dtype=torch.float32, device=x.device)
    block_r, block_d, n_blocks = _launch_shape(m, d)
    if x.numel():
        _reception_fwd_kernel[(n_blocks,)](
            x, total, sent, gate.contiguous() if gated else x, y, rstd if gated else y, l, m, d,
            1.0 / (lane_count - 1), eps, MODE=MODES[mode], BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=num_warps_for(block_r * block_d),
        )  # fmt: skip
    return y, rstd


def reception_bwd_triton(dy, total, sent, gate, rstd, mode: str, lane_count: int):
    """Returns (dtotal, dsent, dgate); dgate is empty unless "gated"."""
    require_launchable(dy)
    l, b, s, d = sent.shape
    m = b * s
    dy, total, sent = dy.contiguous(), total.contiguous(), sent.contiguous()
    gated = gate is not None
    block_r, block_d, n_blocks = _launch_shape(m, d)
    dtotal = torch.empty_like(total)
    dsent = torch.empty_like(sent)
    dgate_part = torch.zeros((l, n_blocks, d) if gated else (0,), dtype=torch.float32, device=dy.device)
    if sent.numel():
        _reception_bwd_kernel[(n_blocks,)](
            dy, total, sent, gate.contiguous() if gated else dy, rstd if gated else dy, dtotal, dsent,
            dgate_part if gated else dy, l, m, d, n_blocks, 1.0 / (lane_count - 1),
            MODE=MODES[mode], BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d),
        )  # fmt: skip
    dgate = dgate_part.sum(1).to(gate.dtype) if gated else dy.new_empty(0)
    return dtotal, dsent, dgate


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("tpblocks::reception", mutates_args=())
def reception_op(
    x: torch.Tensor,
    total: torch.Tensor,
    sent: torch.Tensor,
    gate: torch.Tensor | None,
    mode: str,
    lane_count: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of the delayed reception; see the module docstring."""
    return reception_fwd_triton(x, total, sent, gate, mode, lane_count, eps)


@reception_op.register_fake
def _(x, total, sent, gate, mode, lane_count, eps):
    rstd_shape = x.shape[:-1] if gate is not None else (0,)
    return x.new_empty(x.shape, dtype=_out_dtype(x, gate)), x.new_empty(rstd_shape, dtype=torch.float32)


@torch.library.custom_op("tpblocks::reception_bwd", mutates_args=())
def reception_bwd_op(
    dy: torch.Tensor,
    total: torch.Tensor,
    sent: torch.Tensor,
    gate: torch.Tensor | None,
    rstd: torch.Tensor,
    mode: str,
    lane_count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reception_bwd_triton(dy, total, sent, gate, rstd, mode, lane_count)


@reception_bwd_op.register_fake
def _(dy, total, sent, gate, rstd, mode, lane_count):
    dgate = torch.empty_like(gate) if gate is not None else dy.new_empty(0)
    return torch.empty_like(total), torch.empty_like(sent), dgate


def _setup(ctx, inputs, output):
    x, total, sent, gate, mode, lane_count, _eps = inputs
    ctx.mode, ctx.lane_count = mode, lane_count
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(total, sent, gate, output[1])


def _backward(ctx, dy, _drstd):
    total, sent, gate, rstd = ctx.saved_tensors
    dtotal, dsent, dgate = reception_bwd_op(dy, total, sent, gate, rstd, ctx.mode, ctx.lane_count)
    return dy.to(ctx.x_dtype), dtotal, dsent, (dgate if gate is not None else None), None, None, None


reception_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------- reference


def reference(x, total, sent, gate, mode: str, lane_count: int, eps: float) -> torch.Tensor:
    """Pure torch, the same ops as ``tpblocks.models.delayed.Reception.forward``."""
    _check(x, total, sent, gate, mode, lane_count)
    others = total.unsqueeze(0) - sent
    if mode == "sum":
        return x + others
    others = others / (lane_count - 1)
    if mode == "mean":
        return x + others
    ones = torch.ones(others.shape[-1], dtype=others.dtype, device=others.device)
    normed = ones * F.rms_norm(others.float(), (others.shape[-1],), eps=eps).to(others.dtype)
    return x + gate[:, None, None, :] * normed


def reception_triton(x, total, sent, gate, mode: str, lane_count: int, eps: float) -> torch.Tensor:
    """y through the custom op (differentiable)."""
    return reception_op(x, total, sent, gate if mode == "gated" else None, mode, int(lane_count), float(eps))[0]
