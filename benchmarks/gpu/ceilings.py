"""The two ceilings, measured on this device: device-to-device copy bandwidth and bf16 matmul rate.

Copy GB/s counts bytes read plus bytes written (METHOD.md); the matmul runs on random data (zeros run faster on
an H200). Every other section measures against these, not against datasheet figures.
"""

from __future__ import annotations

import torch

from .common import Settings, bench_ms

GIB = 2**30


def _copy_ms(nbytes: int, settings: Settings, g: torch.Generator) -> float:
    src = torch.randn(nbytes // 4, device=settings.device, generator=g)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), settings, rep_ms=200)  # the buffers go when this returns


def run(settings: Settings, results: dict, phase: str | None = None) -> dict:
    copy_bytes, n = (64 * 2**20, 256) if settings.dry_run else (2 * GIB, 8192)
    g = torch.Generator(device=settings.device).manual_seed(settings.seed)
    copy_ms = _copy_ms(copy_bytes, settings, g)
    a = torch.randn(n, n, device=settings.device, generator=g).to(torch.bfloat16)
    b = torch.randn(n, n, device=settings.device, generator=g).to(torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b, settings, rep_ms=300)
    copy_gbps = 2 * copy_bytes / (copy_ms * 1e-3) / 1e9
    tflops = 2 * n**3 / (mm_ms * 1e-3) / 1e12
    return {
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_GBps": copy_gbps,
        "matmul_n": n,
        "matmul_ms": mm_ms,
        "matmul_bf16_TFLOPs": tflops,
        "summary": [
            ("copy GB/s (read+write)", copy_gbps, f"{copy_bytes / GIB:.2g} GiB buffer"),
            ("bf16 matmul TFLOP/s", tflops, f"{n}^3, random data"),
        ],
    }
