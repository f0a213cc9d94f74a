"""Lane-batched SwiGLU FFN: the fused activation ``silu(g) * u`` and the Burger slice-write down-projection.

Four parts each: ``@triton.jit`` kernels, launchers, torch custom ops (``tpblocks::swiglu``,
``tpblocks::swiglu_bwd``, ``tpblocks::lane_down_into_own_slice``) with fake and autograd registration, and
pure-torch references (the CPU path).

Burger slice write (report Table 3): lane ``l`` of a device's lane stack computes its FFN output
``out_lbsc = act_lbsf @ w_down_lfc`` of width c = h/L and adds it only into feature slice
``lane_offset + l`` of its own residual ``x_lbsd`` (d = h); every other feature is carried unchanged. The kernel
does the down-projection matmul for all lanes in one launch (grid = lanes x row tiles x column tiles) and adds
each tile straight into the right slice, so the (l, b, s, c) FFN output is never written to memory. Semantics
match ``tpblocks.models.lanes.add_into_own_slice(x, lane_matmul(act, w_down), lane_offset)``.

The backward of the slice write is two batched matmuls, left to ``torch.bmm`` (cuBLAS): a Triton kernel there
would only re-implement a GEMM.
"""

import torch
import torch.nn.functional as F

from ._triton import cdiv, dot_in_fp32, interpreting, require_launchable, tl, triton

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _swiglu_fwd_kernel(
    G,  # gate pre-activation, flat
    U,  # up projection, flat
    Y,  # silu(g) * u, flat
    n,  # number of elements
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    # torch rounds silu(g) to the storage dtype before the product; so do we.
    act = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, act * u, mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,  # gradient of y, flat
    G,
    U,
    DG,  # gradient of g, flat
    DU,  # gradient of u, flat
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, dy * silu.to(G.dtype.element_ty).to(tl.float32), mask=mask)
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(DG + offs, dy * u * sig * (1.0 + g * (1.0 - sig)), mask=mask)


@triton.jit
def _lane_down_slice_kernel(
    X,  # (l, M, d) residual in; M = b*s rows
    A,  # (l, M, f) activation silu(g)*u
    W,  # (l, f, c) down-projection weight
    Y,  # (l, M, d) output, a copy of X; the kernel adds into slice (lane_offset + l)
    M,
    d,
    f,
    c,  # slice width h/L
    lane_offset,
    DOT_FP32: tl.constexpr,  # cast operands to fp32 before tl.dot (the interpreter's bf16 dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    lane = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < c
    a_base = A + lane.to(tl.int64) * M * f
    w_base = W + lane.to(tl.int64) * f * c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, f, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < f
        a = tl.load(a_base + rows[:, None] * f + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None] * c + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    # Round the FFN output to the activation dtype first, as the reference's separate matmul does.
    out = acc.to(A.dtype.element_ty).to(tl.float32)
    slice_cols = (lane_offset + lane) * c + cols
    offs = lane.to(tl.int64) * M * d + rows[:, None] * d + slice_cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, x + out, mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def _elementwise_block() -> int:
    return 16384 if interpreting() else 1024


def swiglu_fwd_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    require_launchable(g)
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"gate and up must match: {tuple(g.shape)}/{g.dtype} vs {tuple(u.shape)}/{u.dtype}")
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    n, block = g.numel(), _elementwise_block()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, block),)](g, u, y, n, BLOCK=block)
    return y


def swiglu_bwd_triton(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    require_launchable(dy)
    dy, g, u = dy.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n, block = g.numel(), _elementwise_block()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, block),)](dy, g, u, dg, du, n, BLOCK=block)
    return dg, du


def _check_slice_write(x_lbsd: torch.Tensor, act_lbsf: torch.Tensor, w_lfc: torch.Tensor, lane_offset: int) -> None:
    if x_lbsd.dim() != 4 or act_lbsf.dim() != 4 or w_lfc.dim() != 3:
        raise ValueError("expected x (l, b, s, d), act (l, b, s, f), w_down (l, f, c)")
    l, b, s, d = x_lbsd.shape
    f, c = w_lfc.shape[1:]
    if act_lbsf.shape != (l, b, s, f) or w_lfc.shape[0] != l:
        shapes = f"x {tuple(x_lbsd.shape)}, act {tuple(act_lbsf.shape)}, w_down {tuple(w_lfc.shape)}"
        raise ValueError(f"shapes disagree: {shapes}")
    if act_lbsf.dtype != w_lfc.dtype:
        raise ValueError(
            f"act ({act_lbsf.dtype}) and w_down ({w_lfc.dtype}) must have one dtype, as for a matmul; under autocast "
            f"kernels.ops.lane_down_into_own_slice casts them"
        )
    if d % c or not 0 <= lane_offset or lane_offset + l > d // c:
        raise ValueError(
            f"lanes [{lane_offset}, {lane_offset + l}) do not fit the {d // c} slices of width {c} of d={d}"
        )


def lane_down_into_own_slice_triton(
    x_lbsd: torch.Tensor, act_lbsf: torch.Tensor, w_lfc: torch.Tensor, lane_offset: int
) -> torch.Tensor:
    require_launchable(x_lbsd)
    _check_slice_write(x_lbsd, act_lbsf, w_lfc, lane_offset)
    l, b, s, d = x_lbsd.shape
    f, c = w_lfc.shape[1:]
    x, a, w = x_lbsd.contiguous(), act_lbsf.contiguous(), w_lfc.contiguous()
    y = x.clone()  # features outside each lane's own slice are carried unchanged
    m = b * s
    if interpreting():
        bm, bn, bk = 64, 64, 64  # few programs: the interpreter pays per program, not per element
    else:
        bm, bn, bk = 64, 64, 32
    if m and c:
        grid = (l, cdiv(m, bm), cdiv(c, bn))
        _lane_down_slice_kernel[grid](
            x, a, w, y, m, d, f, c, lane_offset,
            DOT_FP32=dot_in_fp32() or a.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
    return y


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("tpblocks::swiglu", mutates_args=())
def swiglu_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u."""
    return swiglu_fwd_triton(g, u)


@swiglu_op.register_fake
def _(g, u):
    return torch.empty_like(g)


@torch.library.custom_op("tpblocks::swiglu_bwd", mutates_args=())
def swiglu_bwd_op(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd_triton(dy, g, u)


@swiglu_bwd_op.register_fake
def _(dy, g, u):
    return torch.empty_like(g), torch.empty_like(u)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    g, u = ctx.saved_tensors
    return swiglu_bwd_op(dy, g, u)


swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("tpblocks::lane_down_into_own_slice", mutates_args=())
def lane_down_into_own_slice_op(
    x_lbsd: torch.Tensor, act_lbsf: torch.Tensor, w_lfc: torch.Tensor, lane_offset: int
) -> torch.Tensor:
    """x with lane l's ``act[l] @ w[l]`` added into its feature slice ``lane_offset + l``."""
    return lane_down_into_own_slice_triton(x_lbsd, act_lbsf, w_lfc, lane_offset)


@lane_down_into_own_slice_op.register_fake
def _(x_lbsd, act_lbsf, w_lfc, lane_offset):
    return torch.empty_like(x_lbsd, memory_format=torch.contiguous_format)


def _slice_setup(ctx, inputs, output):
    _x, act, w, lane_offset = inputs
    ctx.lane_offset = lane_offset
    ctx.save_for_backward(act, w)


def _slice_backward(ctx, dy_lbsd):
    act_lbsf, w_lfc = ctx.saved_tensors
    l, b, s, f = act_lbsf.shape
    c = w_lfc.shape[-1]
    # In the matmul's dtype: under autocast the residual's gradient (fp32) meets bf16 act / w, as in bmm's backward.
    dout_lmc = own_slices_lbsc(dy_lbsd, ctx.lane_offset, c).reshape(l, b * s, c).to(act_lbsf.dtype)
    dact = torch.bmm(dout_lmc, w_lfc.transpose(1, 2)).view(l, b, s, f)
    dw = torch.bmm(act_lbsf.reshape(l, b * s, f).transpose(1, 2), dout_lmc)
    return dy_lbsd, dact, dw, None


lane_down_into_own_slice_op.register_autograd(_slice_backward, setup_context=_slice_setup)


# ----------------------------------------------------------------------------------------------- references


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pure torch: silu(g) * u, exactly as ``tpblocks.models.lanes.LaneLayer.feed_forward``."""
    return F.silu(g) * u


def own_slices_lbsc(x_lbsd: torch.Tensor, lane_offset: int, c: int) -> torch.Tensor:
    """Slice ``lane_offset + l`` of every lane l: (l, b, s, c)."""
    l, b, s, d = x_lbsd.shape
    own_bscl = torch.diagonal(x_lbsd.reshape(l, b, s, d // c, c), offset=lane_offset, dim1=0, dim2=3)
    return own_bscl.permute(3, 0, 1, 2)


def lane_down_into_own_slice_reference(
    x_lbsd: torch.Tensor, act_lbsf: torch.Tensor, w_lfc: torch.Tensor, lane_offset: int
) -> torch.Tensor:
    """Pure torch: the same ops, in the same order, as ``add_into_own_slice(x, lane_matmul(act, w), offset)``."""
    _check_slice_write(x_lbsd, act_lbsf, w_lfc, lane_offset)
    l, b, s, d = x_lbsd.shape
    f, c = w_lfc.shape[1:]
    out_lbsc = torch.bmm(act_lbsf.reshape(l, b * s, f), w_lfc).view(l, b, s, c)
    y = x_lbsd.clone()
    own_bscl = torch.diagonal(y.view(l, b, s, d // c, c), offset=lane_offset, dim1=0, dim2=3)
    own_bscl.add_(out_lbsc.permute(1, 2, 3, 0))
    return y
