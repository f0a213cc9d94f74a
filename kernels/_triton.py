"""Triton import guard and launch-shape helpers shared by the kernel modules.

Triton is optional at import time: on a machine without it (macOS, a CPU-only wheel) the kernel modules still
import, their ``reference`` functions still run, and only a launch raises. Launch shapes differ between a GPU
and the interpreter (``TRITON_INTERPRET=1``): the interpreter costs ~1-2 ms per program instance whatever
the block size, so there we use few, large programs; on a GPU we use blocks sized for occupancy.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships on Linux; this keeps the reference path alive elsewhere
    HAS_TRITON = False

    class _NoTriton:
        """Stand-in so ``@triton.jit`` definitions still import; launching one raises."""

        @staticmethod
        def jit(fn=None, **_kw):
            def wrap(f):
                def fail(*_a, **_k):
                    raise RuntimeError("Triton is not installed; use the reference path (TPBLOCKS_KERNELS=reference)")

                return f if fn is None else fail

            return wrap(fn) if fn is not None else wrap

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class _NoTl:
        constexpr = object
        float32 = None

    triton = _NoTriton()  # type: ignore[assignment]
    tl = _NoTl()  # type: ignore[assignment]


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``), i.e. on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return int(triton.next_power_of_2(max(1, int(n))))


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def rows_per_program(n_rows: int, block_cols: int) -> int:
    """Rows handled by one program of a row-wise kernel (a power of two).

    Interpreter: a large tile (~16k elements) so that a 5x123x123 test is a handful of programs. GPU: ~4k
    elements per program keeps registers low and leaves enough programs to fill the SMs.
    """
    budget = 16384 if interpreting() else 4096
    return max(1, min(next_pow2(n_rows), budget // max(1, block_cols)))


def num_warps_for(block_elems: int) -> int:
    """Warps for a tile of ``block_elems`` elements (the interpreter ignores it)."""
    return 8 if block_elems >= 8192 else 4 if block_elems >= 2048 else 2


def dot_in_fp32() -> bool:
    """Cast ``tl.dot`` operands to fp32 first: needed in the interpreter, where bf16 ``tl.dot`` is silently wrong."""
    return interpreting()


def require_launchable(*tensors) -> None:
    """Raise an actionable error when a Triton launch cannot work here (no Triton, or CPU without interpreter)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the reference path (TPBLOCKS_KERNELS=reference)")
    for t in tensors:
        if t is not None and not t.is_cuda and not interpreting():
            raise RuntimeError(
                f"a Triton kernel got a {t.device.type} tensor; Triton runs on CUDA only, or on the CPU under "
                f"TRITON_INTERPRET=1 set before `kernels` is imported. Use TPBLOCKS_KERNELS=reference on this machine."
            )
