"""Keep freed memory in the process on CPU, so a training step does not page-fault its activations back in.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks with ``mmap`` and gives
them back to the kernel on ``free``; it also trims the top of its heap back to the kernel. A training step frees
and reallocates the same activation buffers every step, so each step then touches fresh pages and takes one
page fault per 4 KiB of activations (hundreds of thousands per step for a 150M model here). Models with more
activation traffic per parameter (a Burger's full-width lanes) pay the most: on the 2-core development machine
the report's Burger-0 step went from 3.9 s to 2.5 s and its Llama from 1.40 s to 1.34 s
(``benchmarks/train_step.py`` prints which allocator it ran with).

``retain_freed_memory`` tells glibc to serve every block from its heap (``M_MMAP_MAX = 0``) and never trim it
(``M_TRIM_THRESHOLD`` at its maximum), which is what the caching allocators PyTorch's CPU tuning guide
recommends (jemalloc, tcmalloc) do. The cost: the resident size stays at the peak instead of shrinking between
steps. glibc still falls back to ``mmap`` when the heap cannot grow, so no allocation fails because of it.
Nothing happens on other C libraries or with another allocator preloaded (glibc's settings are then unused).
The trainer calls it on CPU unless ``trainer.cpu_allocator=system``; benchmarks unless ``--system-allocator``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Configure glibc malloc to keep and reuse freed memory; True when the setting took effect."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None
