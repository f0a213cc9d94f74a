"""Per-dtype tolerances for comparing a kernel with its reference (Liger-Kernel style), in one place.

Used by ``tests/kernels`` (interpreter on CPU, or the real backend with ``TRITON_INTERPRET=0``) and by the GPU
check ``benchmarks/gpu`` (real CUDA launches). fp32 is tight (reduction order only); fp16 allows one or two
ulps of the intermediate roundings; bf16 also absorbs the interpreter's truncating fp32 -> bf16 casts (seen
here: 500 of 1024 random values differ from torch's round-to-nearest cast), so it is looser than a GPU needs.
"""

from __future__ import annotations

import torch

# (atol, rtol) for outputs and gradients.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (3e-2, 4e-2),
}


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Two-sided closeness |a - e| <= atol*scale + rtol*|e|, elementwise, with the dtype's tolerances.

    ``scale`` widens the absolute part for sums over many terms (e.g. a weight gradient summed over rows).
    NaN never passes, so an output element a kernel left unwritten (poisoned with NaN) fails.
    """
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


def tolerance_use(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> float:
    """The worst |a - e| / (atol*scale + rtol*|e|) over the elements: <= 1 is what ``assert_close_dtype`` passes.

    A NaN or an infinity anywhere in ``actual`` that ``expected`` does not have gives inf (an unwritten element).
    """
    atol, rtol = TOLERANCES[dtype]
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        return float("inf")
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bool(bad.any()):
        return float("inf")
    ratio = (a - e).abs() / (atol * scale + rtol * e.abs())
    ratio = torch.where(torch.isfinite(e), ratio, torch.zeros_like(ratio))
    return float(ratio.max()) if ratio.numel() else 0.0
