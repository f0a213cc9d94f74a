"""Every Triton op against its pure-torch reference on real launches: outputs and every gradient.

For each op, shape and dtype (fp32 / fp16 / bf16): fresh random inputs (the seed is recorded), outputs
poisoned with NaN before each run (``common.poisoned_outputs``), a fresh random upstream gradient, and the
per-dtype tolerance table of ``kernels/tolerances.py``. Shapes are the kernel tests' own odd shapes
(``tests/kernels``, loaded by path) plus, on a GPU, one shape of the report's 1.5B Burger lane (wide rows,
head dim 132, a long cache), so tiling over many programs is exercised. ``torch.library.opcheck`` runs the
tests' own opcheck functions on this device. The kernels run under ``TPBLOCKS_KERNELS=triton``.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import Settings, poisoned_outputs, require_triton

TESTS = Path(__file__).resolve().parents[2] / "tests" / "kernels"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-5
MAX_S = 150  # Triton JIT-compiles every new signature (~0.5-1 s each): the checks left after this are skipped


def test_module(name: str):
    """A kernel test module loaded by file path (``tests`` is no package; a site-packages ``tests`` could shadow it)."""
    spec = importlib.util.spec_from_file_location(f"_tpblocks_kernel_tests_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True, kw_only=True)
class OpCase:
    """One op at one shape: ``make(dtype, device, generator)`` -> args; ``grads``: indices of differentiable args."""

    op: str
    shape: str
    make: Callable[[torch.dtype, torch.device, torch.Generator], tuple]
    triton: Callable[..., object]
    reference: Callable[..., object]
    grads: tuple[int, ...]


def _randn(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, device=device, generator=gen)).to(dtype)


def _rms_cases(shapes) -> list[OpCase]:
    from kernels import rms_norm as K

    cases = []
    for shape in shapes:
        w_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],) if len(shape) == 4 else (shape[-1],)

        def make(dtype, device, gen, shape=shape, w_shape=w_shape):
            w = 1.0 + 0.5 * torch.randn(w_shape, device=device, generator=gen)  # fp32, as the models keep it
            return _randn(shape, dtype, device, gen), w

        cases.append(OpCase(
            op="rms_norm", shape=str(shape), make=make,
            triton=lambda x, w: K.rms_norm_triton(x, w, EPS),
            reference=lambda x, w: K.reference(x, K.group_weight(x, w), EPS),
            grads=(0, 1),
        ))  # fmt: skip
    return cases


def _swiglu_cases(shapes, slice_cases) -> list[OpCase]:
    from kernels import swiglu as K

    cases = []
    for shape in shapes:

        def make(dtype, device, gen, shape=shape):
            return _randn(shape, dtype, device, gen, 2.0), _randn(shape, dtype, device, gen)

        cases.append(OpCase(op="swiglu", shape=str(shape), make=make, triton=K.swiglu_op,
                            reference=K.swiglu_reference, grads=(0, 1)))  # fmt: skip
    for l, b, s, d, f, c, off in slice_cases:

        def make(dtype, device, gen, l=l, b=b, s=s, d=d, f=f, c=c, off=off):
            x, act = _randn((l, b, s, d), dtype, device, gen), _randn((l, b, s, f), dtype, device, gen)
            return x, act, _randn((l, f, c), dtype, device, gen, 1 / math.sqrt(f)), off

        cases.append(OpCase(
            op="burger down+slice write", shape=f"l={l} b={b} s={s} d={d} f={f} c={c} off={off}", make=make,
            triton=K.lane_down_into_own_slice_op, reference=K.lane_down_into_own_slice_reference, grads=(0, 1, 2),
        ))  # fmt: skip
    return cases


def _attention_cases(cases_in) -> list[OpCase]:
    from kernels import decode_attention as K
    from tpblocks.models.layers import RotaryEmbedding

    cases = []
    for b, n, kh, e, t_max, t, splits in cases_in:

        def make(dtype, device, gen, b=b, n=n, kh=kh, e=e, t_max=t_max, t=t, splits=splits):
            table = RotaryEmbedding(e, t_max).to(device)
            q, k = _randn((b, n, e), dtype, device, gen), _randn((b, kh, t_max, e), dtype, device, gen)
            v = _randn((b, kh, t_max, e), dtype, device, gen)
            return q, k, v, t, table.cos[t - 1], table.sin_signed[t - 1], splits

        cases.append(OpCase(
            op="decode attention (RoPE)", shape=f"B={b} n={n} kv={kh} e={e} T={t_max} t={t} splits={splits}",
            make=make, triton=K.decode_attention_op,
            reference=lambda q, k, v, t, cos, sin, _splits: K.reference(q, k, v, t, cos, sin), grads=(0, 1, 2),
        ))  # fmt: skip
    return cases


def _reception_cases(shapes) -> list[OpCase]:
    from kernels import reception as K

    cases = []
    for l, b, s, d, lane_count in shapes:
        for mode in ("sum", "mean", "gated"):

            def make(dtype, device, gen, l=l, b=b, s=s, d=d, lane_count=lane_count, mode=mode):
                x, sent = _randn((l, b, s, d), dtype, device, gen), _randn((l, b, s, d), dtype, device, gen)
                gate = torch.randn(l, d, device=device, generator=gen) if mode == "gated" else None
                return x, _randn((b, s, d), dtype, device, gen), sent, gate, mode, lane_count, EPS

            cases.append(OpCase(
                op=f"reception {mode}", shape=f"l={l} b={b} s={s} d={d} L={lane_count}", make=make,
                triton=K.reception_triton, reference=K.reference, grads=(0, 1, 2, 3) if mode == "gated" else (0, 1, 2),
            ))  # fmt: skip
    return cases


def lane_shapes() -> dict:
    """One GPU-sized shape per op from the report's 1.5B Burger lane (``burger_1p5b_8lane``)."""
    from tpblocks.models.flavors import FLAVORS

    cfg = FLAVORS["burger_1p5b_8lane"]()
    d, f, c, e = cfg.lane_hidden_size, cfg.lane_ffn_hidden, cfg.lane_out_size, cfg.lane_head_dim
    return dict(rms=[(2, 1, 2048, d)], swiglu=[(2, 2048, f)], slice=[(2, 1, 1024, d, f, c, 3)],
                attention=[(8, cfg.lane_heads, cfg.lane_kv_heads, e, 4096, 4001, 0)],
                reception=[(2, 1, 2048, d, cfg.lane_count)])  # fmt: skip


def build_cases(settings: Settings) -> list[OpCase]:
    """The tests' shapes (the smallest of each op on a dry run, where the interpreter is slow) + lane shapes."""
    norm, swiglu = test_module("test_kernel_rms_norm"), test_module("test_kernel_swiglu")
    attention, reception = test_module("test_kernel_decode_attention"), test_module("test_kernel_reception")
    shapes = dict(rms=norm.SHAPES, swiglu=swiglu.SWIGLU_SHAPES, slice=swiglu.SLICE_CASES,
                  attention=attention.CASES, reception=[reception.RECEPTION_SHAPE])  # fmt: skip
    if settings.dry_run:
        shapes = {k: [min(v, key=math.prod)] for k, v in shapes.items()}
    else:
        shapes = {k: v + lane_shapes()[k] for k, v in shapes.items()}
    return (_rms_cases(shapes["rms"]) + _swiglu_cases(shapes["swiglu"], shapes["slice"])
            + _attention_cases(shapes["attention"]) + _reception_cases(shapes["reception"]))  # fmt: skip


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _forward_backward(fn, args: tuple, grads: tuple[int, ...], upstream_seed: int):
    """Outputs and the gradients of ``args[grads]`` for a fresh random upstream gradient on every output."""
    args = tuple(a.detach().clone().requires_grad_(i in grads) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))  # fmt: skip
    with poisoned_outputs():
        outs = [o for o in _as_tuple(fn(*args)) if o.numel()]
        gen = torch.Generator(device=outs[0].device).manual_seed(upstream_seed)
        loss = sum((o.float() * torch.randn(o.shape, device=o.device, generator=gen)).sum() for o in outs)
        inputs = [args[i] for i in grads]
        got = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in outs], [g if g is not None else torch.zeros_like(x) for g, x in zip(got, inputs)]


def check_case(case: OpCase, dtype: torch.dtype, settings: Settings, seed: int) -> dict:
    """Compare one case in one dtype; 'tol_use' is the worst |err| / tolerance (<= 1 passes, NaN is inf)."""
    from kernels.tolerances import tolerance_use

    gen = torch.Generator(device=settings.device).manual_seed(seed)
    args = case.make(dtype, settings.device, gen)
    outs, grads = _forward_backward(case.triton, args, case.grads, seed + 1)
    ref_outs, ref_grads = _forward_backward(case.reference, args, case.grads, seed + 1)
    uses, notes = [], []
    for name, a, e in [(f"out{i}", a, e) for i, (a, e) in enumerate(zip(outs, ref_outs))]:
        if a.dtype != e.dtype or a.shape != e.shape:
            notes.append(f"{name}: {a.dtype}{tuple(a.shape)} vs reference {e.dtype}{tuple(e.shape)}")
        uses.append(tolerance_use(a, e, dtype))
    numel = max(o.numel() for o in ref_outs)
    for a, e in zip(grads, ref_grads):
        # A gradient that sums over many terms (a weight over rows, total over lanes) gets a wider absolute part.
        uses.append(tolerance_use(a, e, dtype, scale=max(1.0, math.sqrt(numel / max(1, e.numel())))))
    worst = max(uses)
    return {"op": case.op, "shape": case.shape, "dtype": str(dtype).removeprefix("torch."), "tol_use": worst,
            "passed": worst <= 1.0 and not notes, "notes": "; ".join(notes), "seed": seed}  # fmt: skip


def opchecks(settings: Settings) -> list[dict]:
    """The kernel tests' own ``torch.library.opcheck`` functions, on this device."""
    rows = []
    for name in ("test_kernel_rms_norm", "test_kernel_swiglu", "test_kernel_decode_attention", "test_kernel_reception"):
        t0 = time.perf_counter()
        try:
            with torch.device(settings.device):
                test_module(name).test_opcheck()
            rows.append({"opcheck": name, "passed": True, "error": "", "s": round(time.perf_counter() - t0, 1)})
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            rows.append({"opcheck": name, "passed": False, "error": f"{type(e).__name__}: {e}"[:300],
                         "s": round(time.perf_counter() - t0, 1)})  # fmt: skip
    return rows


def run(settings: Settings, results: dict, phase: str | None = None) -> dict:
    from kernels import dispatch

    require_triton()
    rows, seed, skipped = [], settings.seed, []
    stop = time.monotonic() + MAX_S
    with dispatch.forced("triton"):
        for case in build_cases(settings):
            for dtype in DTYPES:
                seed += 2
                if not settings.dry_run and (time.monotonic() > stop or not settings.budget.allows(60)):
                    skipped.append(f"{case.op} {case.shape} {dtype}")
                    continue
                try:
                    rows.append(check_case(case, dtype, settings, seed))
                except Exception as e:  # noqa: BLE001 - a launch that fails is a finding, not the end of the run
                    rows.append({"op": case.op, "shape": case.shape, "dtype": str(dtype).removeprefix("torch."),
                                 "tol_use": math.inf, "passed": False, "notes": f"{type(e).__name__}: {e}"[:300],
                                 "seed": seed})  # fmt: skip
        ops = opchecks(settings)
    failed = [r for r in rows if not r["passed"]]
    per_op: dict[str, list[dict]] = {}
    for r in rows:
        per_op.setdefault(r["op"], []).append(r)
    summary = [(f"{op} ({len(rs)} checks)", f"{sum(r['passed'] for r in rs)}/{len(rs)} pass",
                f"worst tol_use {max(r['tol_use'] for r in rs):.2g}") for op, rs in per_op.items()]  # fmt: skip
    summary.append(("opcheck", f"{sum(r['passed'] for r in ops)}/{len(ops)} pass",
                    "; ".join(r["error"][:60] for r in ops if not r["passed"])))  # fmt: skip
    if skipped:
        summary.append(("checks skipped (time)", str(len(skipped)), skipped[0]))
    return {"rows": rows, "opcheck": ops, "failures": failed, "skipped": skipped, "summary": summary,
            "table": [{k: r[k] for k in ("op", "shape", "dtype")} | {"tol_use": f"{r['tol_use']:.2g}",
                      "ok": "yes" if r["passed"] else "NO", "notes": r["notes"][:80]} for r in rows]}  # fmt: skip
