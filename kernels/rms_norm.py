"""RMSNorm ``y = w * rmsnorm(x)`` with per-lane weights in one launch, forward and backward.

Four parts: the ``@triton.jit`` kernels, the launchers, the torch custom ops ``tpblocks::rms_norm`` /
``tpblocks::rms_norm_bwd`` (fake + autograd registration), and ``reference`` (pure torch, the CPU path).

Numerics follow ``tpblocks.models.layers.rms_norm`` (Hugging Face Llama): normalise in fp32, cast the
normalised value back to the input dtype, then multiply by the weight (so an fp32 weight on an fp16 input
gives an fp32 output, as torch type promotion does).

Lanes: the weight may be one vector per *group* of rows, ``weight_gd`` (g, d), with the rows of ``x`` split
into g equal contiguous groups. ``x_lbsd`` with a per-lane ``norm_ld`` is g = l groups of b*s rows: all lanes'
norms are one launch. The backward writes partial weight gradients per program and sums them in torch
(Triton tutorial 05-layer-norm does the same in a second kernel; one ``sum`` is as fast and simpler).
"""

import torch

from ._triton import (
    cdiv,
    next_pow2,
    num_warps_for,
    require_launchable,
    rows_per_program,
    tl,
    triton,
)

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # (n_rows, D) input
    W,  # (G, D) weight, one row per group of rows
    Y,  # (n_rows, D) output, dtype = promote(x, w)
    RSTD,  # (n_rows,) fp32 1/rms, saved for the backward
    rows_per_group,  # rows sharing one weight row (b*s for lanes; all rows when G == 1)
    n_cols,  # D
    eps,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D: a whole row lives in registers
):
    group = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < rows_per_group
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    grow = group * rows_per_group + rows  # global row index
    offs = grow[:, None].to(tl.int64) * n_cols + cols[None, :]
    x32 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) / n_cols + eps)
    # Round the normalised value to the input dtype before the weight multiply: the reference does.
    xhat = (x32 * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + group * n_cols + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, xhat * w[None, :], mask=mask)
    tl.store(RSTD + grow, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # (n_rows, D) gradient of y
    X,  # (n_rows, D) the forward input
    W,  # (G, D)
    RSTD,  # (n_rows,)
    DX,  # (n_rows, D) gradient of x
    DW_PART,  # (G, n_blocks, D) fp32 partial weight gradients, summed by the launcher
    rows_per_group,
    n_cols,
    n_blocks,  # programs per group (second grid axis)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    group = tl.program_id(0)
    block = tl.program_id(1)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < rows_per_group
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    grow = group * rows_per_group + rows
    offs = grow[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + grow, mask=row_ok, other=0.0)
    w = tl.load(W + group * n_cols + cols, mask=col_ok, other=0.0).to(tl.float32)
    xhat = x.to(tl.float32) * rstd[:, None]
    wdy = dy * w[None, :]
    # d/dx of x*rstd(x): rstd * (g - xhat * mean(g * xhat)), g = dy*w
    c = tl.sum(wdy * xhat, axis=1) / n_cols
    dx = (wdy - xhat * c[:, None]) * rstd[:, None]
    tl.store(DX + offs, dx, mask=mask)
    # The weight multiplies the dtype-rounded xhat in the forward, so its gradient uses the rounded value too.
    xhat_rounded = xhat.to(X.dtype.element_ty).to(tl.float32)
    dw = tl.sum(dy * xhat_rounded, axis=0)
    tl.store(DW_PART + (group * n_blocks + block) * n_cols + cols, dw, mask=col_ok)


# ----------------------------------------------------------------------------------------------- launchers


def _check(x: torch.Tensor, weight_gd: torch.Tensor) -> tuple[int, int, int]:
    d = x.shape[-1]
    if weight_gd.dim() != 2 or weight_gd.shape[1] != d:
        raise ValueError(f"weight must be (groups, {d}); got {tuple(weight_gd.shape)}")
    n_rows = x.numel() // d
    g = weight_gd.shape[0]
    if n_rows % g:
        raise ValueError(f"{n_rows} rows do not split into {g} weight groups")
    return n_rows, g, d


def _launch_shape(rows_per_group: int, d: int) -> tuple[int, int, int]:
    block_d = next_pow2(d)
    block_r = rows_per_program(rows_per_group, block_d)
    return block_r, block_d, cdiv(rows_per_group, block_r)


def rms_norm_fwd_triton(x: torch.Tensor, weight_gd: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (y, rstd)."""
    require_launchable(x)
    n_rows, g, d = _check(x, weight_gd)
    x, weight_gd = x.contiguous(), weight_gd.contiguous()
    y = torch.empty(x.shape, dtype=torch.result_type(x, weight_gd), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows_per_group = n_rows // g
    block_r, block_d, n_blocks = _launch_shape(rows_per_group, d)
    if n_rows:
        _rms_norm_fwd_kernel[(g, n_blocks)](
            x, weight_gd, y, rstd, rows_per_group, d, eps,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d),
        )  # fmt: skip
    return y, rstd


def rms_norm_bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, weight_gd: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns (dx, dweight_gd)."""
    require_launchable(dy)
    n_rows, g, d = _check(x, weight_gd)
    dy, x, weight_gd, rstd = dy.contiguous(), x.contiguous(), weight_gd.contiguous(), rstd.contiguous()
    rows_per_group = n_rows // g
    block_r, block_d, n_blocks = _launch_shape(rows_per_group, d)
    dx = torch.empty_like(x)
    dw_part = torch.zeros(g, n_blocks, d, dtype=torch.float32, device=x.device)
    if n_rows:
        _rms_norm_bwd_kernel[(g, n_blocks)](
            dy, x, weight_gd, rstd, dx, dw_part, rows_per_group, d, n_blocks,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d),
        )  # fmt: skip
    return dx, dw_part.sum(1).to(weight_gd.dtype)


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("tpblocks::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight_gd: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of ``y = weight * rmsnorm(x)``."""
    return rms_norm_fwd_triton(x, weight_gd, eps)


@rms_norm_op.register_fake
def _(x, weight_gd, eps):
    y = x.new_empty(x.shape, dtype=torch.result_type(x, weight_gd))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tpblocks::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight_gd: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd_triton(dy, x, weight_gd, rstd)


@rms_norm_bwd_op.register_fake
def _(dy, x, weight_gd, rstd):
    return torch.empty_like(x), torch.empty_like(weight_gd)


def _setup_context(ctx, inputs, output):
    x, weight_gd, _eps = inputs
    ctx.save_for_backward(x, weight_gd, output[1])


def _backward(ctx, dy, _drstd):
    x, weight_gd, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd_op(dy, x, weight_gd, rstd)
    return dx, dw, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- reference


def reference(x: torch.Tensor, weight_gd: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure torch ``y``. Same math as ``tpblocks.models.layers.rms_norm``."""
    g, d = weight_gd.shape
    normed = torch.nn.functional.rms_norm(x.reshape(g, -1, d).float(), (d,), eps=eps)
    y = weight_gd[:, None, :] * normed.to(x.dtype)
    return y.reshape(x.shape)


def group_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as (g, d) rows-groups of ``x``, or None when its broadcast is not a contiguous grouping.

    Accepts (d,) and lane weights shaped like ``norm_ld[:, None, None, :]`` (leading dim = x's, ones between).
    """
    d = x.shape[-1]
    if weight.shape[-1] != d:
        return None
    if weight.dim() == 1:
        return weight.view(1, d)
    if weight.dim() == x.dim() and all(n == 1 for n in weight.shape[1:-1]) and weight.shape[0] in (1, x.shape[0]):
        return weight.reshape(weight.shape[0], d)
    return None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``y`` through the custom op (differentiable)."""
    weight_gd = group_weight(x, weight)
    if weight_gd is None:
        raise ValueError(f"weight shape {tuple(weight.shape)} is not (d,) or (l, 1, .., 1, d) for x {tuple(x.shape)}")
    return rms_norm_op(x, weight_gd, float(eps))[0]
