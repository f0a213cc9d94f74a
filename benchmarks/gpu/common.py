"""What every section of the GPU check shares: the run settings, the time budget, timing and compiling.

Nothing here imports ``kernels``: ``run.py`` sets ``TRITON_INTERPRET`` for a dry run before any kernel module is
imported (the ``@triton.jit`` decorator reads it at import).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class OutOfTime(BaseException):
    """Raised in the main thread when the global budget is spent (a BaseException, so no ``except Exception``
    inside a section swallows it)."""


class Budget:
    """Seconds left of the whole run; ``arm()`` makes the deadline interrupt whatever runs then (SIGALRM)."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"--budget-s={seconds} must be positive")
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, need_s: float) -> bool:
        """Whether a step estimated to take ``need_s`` seconds still fits."""
        return self.left() >= need_s

    def arm(self, cap_s: float | None = None) -> None:
        """Interrupt at the deadline, or after ``cap_s`` seconds if that comes first."""
        left = self.left()
        capped = cap_s is not None and cap_s < left
        limit = cap_s if capped else left
        reason = f"the section's {cap_s:.0f} s cap" if capped else f"the {self.seconds:.0f} s budget is spent"

        def _raise(_signum, _frame):
            raise OutOfTime(f"interrupted: {reason}")

        if hasattr(signal, "setitimer"):
            signal.signal(signal.SIGALRM, _raise)
            signal.setitimer(signal.ITIMER_REAL, max(0.01, limit))

    @staticmethod
    def disarm() -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How this run goes: on a GPU at full size, or a dry run on the CPU at tiny sizes."""

    device: torch.device
    dry_run: bool
    budget: Budget
    seed: int
    # The dry run traces through Dynamo and AOT autograd but skips inductor's code generation (minutes on a CPU).
    compile_backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def require_triton() -> None:
    """ImportError (the section is then skipped with this message) when Triton is not installed."""
    from kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        raise ImportError("triton is not installed: the kernel sections need it (pip install triton)")


def bench_ms(fn: Callable[[], object], settings: Settings, rep_ms: float = 100, warmup_ms: float = 25) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` (CUDA events, L2 flushed) on a GPU, else wall clock."""
    if settings.cuda:
        try:
            from triton.testing import do_bench
        except ImportError:
            return _event_median_ms(fn, reps=max(10, int(rep_ms)))
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    from benchmarks.kernels.run_all import cpu_bench_ms

    return cpu_bench_ms(fn, min_time_s=rep_ms / 1e3)


def _event_median_ms(fn: Callable[[], object], reps: int) -> float:
    """CUDA-event median when Triton is missing (its do_bench is the same method)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """Make ``torch.compile`` calls inside use ``backend`` (for code that compiles by itself, e.g. the engine)."""
    if backend == "inductor":
        yield
        return
    real = torch.compile

    def patched(*args, **kw):
        kw.pop("mode", None)
        return real(*args, backend=backend, **kw)

    torch.compile = patched
    try:
        yield
    finally:
        torch.compile = real


def compile_fn(fn: Callable, settings: Settings, **kw) -> Callable:
    """``torch.compile`` with this run's backend (inductor on a GPU)."""
    with compile_backend(settings.compile_backend):
        return torch.compile(fn, **kw)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(math.nan)
    return t


@contextmanager
def poisoned_outputs() -> Iterator[None]:
    """``torch.empty`` / ``torch.empty_like`` return NaN-filled tensors inside: an output element a kernel never
    writes stays NaN, and NaN fails every comparison (METHOD: poison the output before each run)."""
    real_empty, real_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: _poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def synchronize(settings: Settings) -> None:
    if settings.cuda:
        torch.cuda.synchronize()


def fmt(x: float | None, digits: int = 3) -> str:
    """A figure for the tables: 3 significant digits, '-' when missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"
