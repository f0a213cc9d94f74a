"""Kernel microbenchmarks: every Triton kernel against torch eager and torch.compile of its reference.

    python -m benchmarks.kernels [--quick] [--json PATH]
    python benchmarks/kernels/run_all.py [--quick] [--json PATH]

On CUDA each case is timed with ``triton.testing.do_bench`` for three implementations side by side: the Triton op,
the pure-torch reference in eager mode, and ``torch.compile`` of the same reference; the table gives ms, the
effective bandwidth (bytes the op must read and write / time) and the speed-up over eager, plus the device name.
Without a GPU it says so and times the reference path only (eager, CPU wall clock): Triton has no CPU backend
(its interpreter is for correctness and ~1000x slower) and a cold ``torch.compile`` on CPU costs minutes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from kernels import decode_attention, reception, rms_norm, swiglu  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Case:
    """One benchmark: implementations to time and the bytes the op must move at minimum."""

    kernel: str
    shape: str
    triton_fn: Callable[[], object]
    reference_fn: Callable[[], object]
    nbytes: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sizes(quick: bool, cuda: bool) -> dict:
    """Shapes per kernel: l lanes, m rows = b*s, d width, f FFN size, c slice width (h/L), bq decode sequences,
    n / kh query / KV heads, e head dim, t cache length. Llama-1B-like widths on GPU, small ones on CPU."""
    if not cuda:
        return dict(l=4, m=256, d=512, f=768, c=128, bq=8, n=8, kh=2, e=64, t=1024)
    if quick:
        return dict(l=4, m=2048, d=2048, f=2816, c=512, bq=16, n=16, kh=4, e=128, t=2048)
    return dict(l=4, m=8192, d=4096, f=5632, c=1024, bq=32, n=32, kh=8, e=128, t=8192)


def build_cases(z: dict, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """One case per kernel at the shapes ``z`` (keys as ``sizes`` returns)."""
    kw = dict(device=device, dtype=dtype)
    l, m, d, f, c = z["l"], z["m"], z["d"], z["f"], z["c"]
    cases = []

    x = torch.randn(l, m, d, **kw)
    w_ld = torch.rand(l, d, device=device) + 0.5
    cases.append(Case(
        kernel="rms_norm fwd", shape=f"l={l} rows={m} d={d}",
        triton_fn=lambda: rms_norm.rms_norm_op(x, w_ld, 1e-5),
        reference_fn=lambda: rms_norm.reference(x, w_ld, 1e-5),
        nbytes=_nbytes(x, w_ld) + _nbytes(x),  # read x (and the weights), write y
    ))  # fmt: skip

    xg = x.detach().clone().requires_grad_(True)
    wg = w_ld.detach().clone().requires_grad_(True)
    dy = torch.randn_like(x)

    def norm_fwd_bwd(fn):
        def run():
            torch.autograd.grad(fn(xg, wg, 1e-5), (xg, wg), dy)

        return run

    cases.append(Case(
        kernel="rms_norm fwd+bwd", shape=f"l={l} rows={m} d={d}",
        triton_fn=norm_fwd_bwd(lambda *a: rms_norm.rms_norm_op(*a)[0]), reference_fn=norm_fwd_bwd(rms_norm.reference),
        nbytes=5 * _nbytes(x),  # fwd: read x, write y; bwd: read x, dy, write dx (weights negligible)
    ))  # fmt: skip

    g, u = torch.randn(l, m, f, **kw), torch.randn(l, m, f, **kw)
    cases.append(Case(
        kernel="swiglu fwd", shape=f"l={l} rows={m} f={f}",
        triton_fn=lambda: swiglu.swiglu_op(g, u), reference_fn=lambda: swiglu.swiglu_reference(g, u),
        nbytes=3 * _nbytes(g),
    ))  # fmt: skip

    xs = torch.randn(l, 1, m, d, **kw)
    act = torch.randn(l, 1, m, f, **kw)
    w_down = torch.randn(l, f, c, **kw) / math.sqrt(f)
    cases.append(Case(
        kernel="burger down+slice write", shape=f"l={l} rows={m} f={f} c={c} d={d}",
        triton_fn=lambda: swiglu.lane_down_into_own_slice_op(xs, act, w_down, 0),
        reference_fn=lambda: swiglu.lane_down_into_own_slice_reference(xs, act, w_down, 0),
        nbytes=2 * _nbytes(xs) + _nbytes(act, w_down),
    ))  # fmt: skip

    bq, n, kh, e, t = z["bq"], z["n"], z["kh"], z["e"], z["t"]
    q = torch.randn(bq, n, e, **kw)
    kc, vc = torch.randn(bq, kh, t, e, **kw), torch.randn(bq, kh, t, e, **kw)
    cos = torch.rand(e, device=device)
    sin = torch.rand(e, device=device)
    cases.append(Case(
        kernel="decode attention (GQA, RoPE)", shape=f"B={bq} n={n} kv={kh} e={e} t={t}",
        triton_fn=lambda: decode_attention.decode_attention_op(q, kc, vc, t, cos, sin, 0),
        reference_fn=lambda: decode_attention.reference(q, kc, vc, t, cos, sin),
        nbytes=_nbytes(kc, vc) + 2 * _nbytes(q),
    ))  # fmt: skip

    tot = torch.randn(m, d, **kw).view(1, m, d)
    sent = torch.randn(l, 1, m, d, **kw)
    xr = torch.randn(l, 1, m, d, **kw)
    gate = torch.randn(l, d, **kw)
    cases.append(Case(
        kernel="reception gated", shape=f"l={l} rows={m} d={d}",
        triton_fn=lambda: reception.reception_op(xr, tot, sent, gate, "gated", 8, 1e-5),
        reference_fn=lambda: reception.reference(xr, tot, sent, gate, "gated", 8, 1e-5),
        nbytes=3 * _nbytes(xr) + _nbytes(tot, gate),
    ))  # fmt: skip
    return cases


def cpu_bench_ms(fn: Callable[[], object], min_time_s: float) -> float:
    """Median ms of repeated calls after one warm-up call, for at least ``min_time_s``."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    return statistics.median(times)


def time_case(case: Case, bench: Callable[[Callable], float], compile_fn: Callable | None) -> dict[str, float]:
    """ms of the Triton op, the eager reference and ``compile_fn(reference)``; only the eager reference without
    ``compile_fn`` (no GPU: Triton has no CPU backend, its interpreter is for correctness)."""
    impls = {"eager": case.reference_fn}
    if compile_fn is not None:
        impls = {"triton": case.triton_fn, "eager": case.reference_fn, "compile": compile_fn(case.reference_fn)}
    return {name: bench(fn) for name, fn in impls.items()}


def run(quick: bool) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    info = machine_info()
    if cuda:
        import triton.testing

        bench = lambda fn: triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 100)  # noqa: E731
        print(f"device: {torch.cuda.get_device_name()}  dtype: {dtype}  (triton vs torch eager vs torch.compile)")
    else:
        bench = lambda fn: cpu_bench_ms(fn, 0.5 if quick else 2.0)  # noqa: E731
        cpu = info.get("cpu_model") or info.get("processor")
        print(
            f"no CUDA device: timing the reference path only (torch eager on {cpu}, {torch.get_num_threads()} "
            f"threads, load average {info.get('loadavg_1_5_15')}); Triton kernels need a GPU (the interpreter is "
            f"for correctness only)"
        )
    rows = []
    for case in build_cases(sizes(quick, cuda), device, dtype):
        times = time_case(case, bench, torch.compile if cuda else None)
        for name, ms in times.items():
            rows.append(
                {
                    "kernel": case.kernel,
                    "shape": case.shape,
                    "impl": name,
                    "ms": f"{ms:.4f}",
                    "GB/s": f"{case.nbytes / ms / 1e6:.1f}",
                    "vs eager": f"{times['eager'] / ms:.2f}x",
                }
            )
    print_table(rows, title="kernel microbenchmarks")
    return {"machine": info, "dtype": str(dtype), "quick": quick, "cuda": cuda, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (~1 min)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    result = run(args.quick)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
