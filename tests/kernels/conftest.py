"""Shared fixtures of the kernel tests: the per-dtype tolerance table and a reset of the dispatch mode.

The Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before any kernel module is imported)
runs the kernels on the CPU; with ``TRITON_INTERPRET=0`` exported on a GPU machine the same tests run on CUDA.
The interpreter's fp32 -> bf16 conversion truncates instead of rounding to nearest (seen here: 500 of 1024
random values differ from torch's cast), so bf16 is checked with a looser tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

# (atol, rtol) for outputs and gradients, Liger-Kernel style. fp32 is tight (reduction order only); fp16 allows
# one or two ulps of the intermediate roundings; bf16 also absorbs the interpreter's truncating casts.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (3e-2, 4e-2),
}


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Two-sided closeness |a - e| <= atol*scale + rtol*|e|, elementwise, with the dtype's tolerances."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


@pytest.fixture(autouse=True)
def _kernel_device():
    """Interpreter (the default here): CPU tensors. ``TRITON_INTERPRET=0`` on a GPU machine: the same tests build
    their tensors on CUDA and exercise the real backend."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        yield
        return
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no GPU: the Triton kernels cannot run here")
    with torch.device("cuda"):
        yield


@pytest.fixture(autouse=True)
def _reset_kernel_mode():
    from kernels import dispatch

    dispatch.set_mode(None)
    yield
    dispatch.set_mode(None)


@pytest.fixture
def close():
    """``close(actual, expected, dtype, scale=1.0)``; a fixture, since conftests are not importable."""
    return assert_close_dtype
