"""Shared fixtures of the kernel tests: the per-dtype tolerance table and a reset of the dispatch mode.

The Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before any kernel module is imported)
runs the kernels on the CPU; with ``TRITON_INTERPRET=0`` exported on a GPU machine the same tests run on CUDA.
The per-dtype tolerance table lives in ``kernels/tolerances.py`` (shared with the GPU check ``benchmarks/gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.tolerances import assert_close_dtype


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
