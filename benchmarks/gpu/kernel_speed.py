"""Kernel speed at the report's 1.5B lane shapes: the Triton op vs torch eager vs torch.compile of its reference.

The cases are ``benchmarks/kernels/run_all.py``'s (same ops, same byte counts); only the shapes change: one lane
of ``burger_1p5b_8lane`` per GPU (the 8-GPU placement), a micro-batch of 8 x 2048 tokens, and 64 sequences
decoding over a 4096-token cache. GB/s = bytes the op must read and write / median time, next to the copy
bandwidth measured by the ceilings section.
"""

from __future__ import annotations

from .common import Settings, bench_ms, compile_fn, require_triton

DRY_SIZES = dict(l=2, m=64, d=64, f=96, c=32, bq=2, n=4, kh=1, e=16, t=64)


def lane_sizes() -> dict:
    """``run_all.sizes``' keys at one ``burger_1p5b_8lane`` lane per GPU."""
    from tpblocks.models.flavors import FLAVORS

    cfg = FLAVORS["burger_1p5b_8lane"]()
    return dict(l=1, m=8 * 2048, d=cfg.lane_hidden_size, f=cfg.lane_ffn_hidden, c=cfg.lane_out_size, bq=64,
                n=cfg.lane_heads, kh=cfg.lane_kv_heads, e=cfg.lane_head_dim, t=4096)  # fmt: skip


def run(settings: Settings, results: dict, phase: str | None = None) -> dict:
    import torch

    from benchmarks.kernels.run_all import build_cases, time_case
    from kernels import dispatch

    require_triton()
    z = DRY_SIZES if settings.dry_run else lane_sizes()
    dtype = torch.bfloat16 if settings.cuda else torch.float32
    copy = results.get("ceilings", {}).get("copy_GBps")
    rows, summary = [], []
    rep = 5 if settings.dry_run else 100
    with dispatch.forced("triton"):
        for case in build_cases(z, settings.device, dtype):
            if not settings.budget.allows(20):
                summary.append((case.kernel, "skipped", "time budget"))
                continue
            times = time_case(case, lambda fn: bench_ms(fn, settings, rep_ms=rep), lambda f: compile_fn(f, settings))
            for impl, ms in times.items():
                gbps = case.nbytes / ms / 1e6
                rows.append({"kernel": case.kernel, "shape": case.shape, "impl": impl, "ms": round(ms, 4),
                             "GB/s": round(gbps, 1), "of copy": round(gbps / copy, 3) if copy else None,
                             "vs eager": round(times["eager"] / ms, 2)})  # fmt: skip
            best = min((n for n in times if n != "triton"), key=times.get)
            summary.append(
                (
                    f"{case.kernel}: triton GB/s",
                    case.nbytes / times["triton"] / 1e6,
                    f"{times[best] / times['triton']:.2f}x vs {best}"
                    + (f", {case.nbytes / times['triton'] / 1e6 / copy:.2f} of copy" if copy else ""),
                )
            )
    return {"dtype": str(dtype), "sizes": z, "rows": rows, "table": rows, "summary": summary}
