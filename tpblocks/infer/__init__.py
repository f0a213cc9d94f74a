"""Inference: the decode engine (``DecodeEngine``: static KV cache, compiled step, device-side sampling),
KV-cache generation (``generate``), the report's decode-time model (``perfmodel``, Eq. 1-11) and
its calibration on the current machine (``calibrate``: measured t_sync and memory bandwidth)."""

from . import perfmodel
from .engine import DecodeEngine, sample
from .generate import generate, sample_next
from .perfmodel import Hardware, get_hardware, predict

__all__ = ["DecodeEngine", "Hardware", "generate", "get_hardware", "perfmodel", "predict", "sample", "sample_next"]
