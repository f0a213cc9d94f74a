"""Which implementation the models use: the Triton kernels or the pure-torch reference.

Modes:
  "auto"       (default) Triton when the tensor is on CUDA and Triton is installed, the reference otherwise.
  "triton"     always Triton. On a CPU this needs ``TRITON_INTERPRET=1`` set before ``kernels`` is imported
               (the interpreter; correctness only, thousands of times slower).
  "reference"  always the pure-torch reference (the numerics the Hugging Face parity tests pin down).

Set by the environment variable ``TPBLOCKS_KERNELS`` (read at every call, so a launcher may set it late), or
by ``set_mode(...)`` / ``with forced(...)`` which override the variable. This module imports nothing heavy so
``tpblocks.models`` can consult it without importing Triton.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MODES = ("auto", "triton", "reference")
ENV_VAR = "TPBLOCKS_KERNELS"

_override: str | None = None


def _validate(mode: str, source: str) -> str:
    mode = mode.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not a kernel mode; use one of {', '.join(MODES)}")
    return mode


def get_mode() -> str:
    """The active mode: ``set_mode``/``forced`` if used, else ``$TPBLOCKS_KERNELS``, else "auto"."""
    if _override is not None:
        return _override
    return _validate(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def set_mode(mode: str | None) -> None:
    """Force a mode for this process ("auto" | "triton" | "reference"); ``None`` goes back to the env var."""
    global _override
    _override = None if mode is None else _validate(mode, "kernel mode")


@contextmanager
def forced(mode: str) -> Iterator[None]:
    """``with forced("triton"): ...`` runs the block in ``mode`` and restores the previous setting."""
    global _override
    previous = _override
    set_mode(mode)
    try:
        yield
    finally:
        _override = previous


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` should launch the Triton kernel under the active mode.

    "triton" on a CPU tensor without the interpreter raises here, with the fix, instead of deep inside Triton.
    """
    mode = get_mode()
    if mode == "reference":
        return False
    if mode == "auto":
        return x.is_cuda and triton_installed()
    if not triton_installed():
        raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed; pip install triton or use 'reference'")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"{ENV_VAR}=triton on a {x.device.type} tensor needs TRITON_INTERPRET=1 set before `kernels` is "
            f"imported (Triton's CPU interpreter, for correctness checks only); or use 'auto'/'reference'"
        )
    return True
