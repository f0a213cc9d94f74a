"""Batch-1 decode on one GPU: CUDA-graph and compiled decode us/token against the HBM roofline, and the 8-GPU
speed-up that ``perfmodel`` predicts from these measured per-GPU times.

Models (bf16, a KV cache of ``CONTEXT`` positions filled with random keys/values, decoding at its last position):
  tinyllama_1p1b          the report's §6.7 reference, whole, on 1 GPU
  burger/sandwich 1 of 8  what one GPU of 8 holds for ``burger_1p5b_8lane`` / ``sandwich_1p5b_8lane``: 1 lane
                          of each TP block + its Megatron share of the classic layer, embedding and head replicated
  tinyllama TP8 shard     one Megatron shard of 8 (4 of 32 query heads, 1 KV head, 1/8 of each FFN)
A rank's share is built without torch.distributed: the full model is cut by ``tpblocks.parallel.shard_model``
with a communicator that says "rank 0 of 8" and has communication switched off (``comm.enabled = False``), so
the step does that rank's memory traffic and none of the collectives; ``perfmodel`` adds them back as
``syncs x t_sync``. Timed two ways: "graph", the eager step (Triton kernels on) captured in one CUDA graph, and
"compiled", ``DecodeEngine(compile=True)`` (``torch.compile`` fullgraph, mode "reduce-overhead" = CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .common import Settings, bench_ms, compile_backend, fmt

CONTEXT = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeCase:
    label: str
    flavor: str
    devices: int  # 1: the whole model; G: rank 0's share of a G-GPU placement


def cases(dry_run: bool) -> list[DecodeCase]:
    if dry_run:  # the debug flavors have 4 lanes: "1 of 4"
        return [DecodeCase(label="llama 1 GPU", flavor="debug_llama", devices=1),
                DecodeCase(label="burger 1 of 4", flavor="debug_burger", devices=4),
                DecodeCase(label="sandwich 1 of 4", flavor="debug_sandwich", devices=4),
                DecodeCase(label="llama TP4 shard", flavor="debug_llama", devices=4),
                DecodeCase(label="dtp 1 of 2", flavor="debug_dtp", devices=2)]  # fmt: skip
    return [DecodeCase(label="tinyllama 1 GPU", flavor="tinyllama_1p1b", devices=1),
            DecodeCase(label="burger_1p5b 1 of 8", flavor="burger_1p5b_8lane", devices=8),
            DecodeCase(label="sandwich_1p5b 1 of 8", flavor="sandwich_1p5b_8lane", devices=8),
            DecodeCase(label="tinyllama TP8 shard", flavor="tinyllama_1p1b", devices=8),
            DecodeCase(label="laneformer_2b 1 of 8", flavor="laneformer_2b", devices=8)]  # fmt: skip


def one_rank_comm(devices: int):
    """A communicator for rank 0 of ``devices`` with every collective switched off (local work only)."""
    from tpblocks.models import LocalComm

    comm = LocalComm()
    comm.lane_world = comm.tp_world = devices
    comm.enabled = False
    return comm


def build_share(case: DecodeCase, device: torch.device):
    """The whole model (devices=1) or rank 0's share of it, fp32 master weights on ``device``."""
    from tpblocks.models import build_model, get_flavor
    from tpblocks.parallel import shard_model

    cfg = get_flavor(case.flavor)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg).eval()
    if case.devices > 1:
        shard_model(model, one_rank_comm(case.devices))
    return cfg, model


def _engine(model, settings: Settings, compiled: bool, context: int):
    from tpblocks.infer.engine import DecodeEngine

    with compile_backend(settings.compile_backend):
        engine = DecodeEngine(model, batch=1, max_seq_len=context, dtype="bf16", compile=compiled)
    # Random keys/values (never time on zeros); the mask reads all ``context`` positions at the last one.
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed)
    for buf in engine.cache._k + engine.cache._v:  # the engine has no public filler; a benchmark-only write
        buf.copy_(torch.randn(buf.shape, device=buf.device, generator=gen))
    return engine


def _graph_step(engine, tokens, pos, settings: Settings):
    """(the eager decode step captured in one CUDA graph, note); on a CPU, or when the capture fails (a host sync
    inside the step), the eager step itself and a note saying so."""
    step = lambda: engine.decode(tokens, pos)  # noqa: E731
    if not settings.cuda:
        return step, "eager (no CUDA graphs on a CPU)"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: Triton compiles, cuBLAS picks its kernels
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as e:  # noqa: BLE001 - timed eagerly instead, and said
        torch.cuda.synchronize()
        return step, f"eager: CUDA-graph capture failed ({type(e).__name__}: {str(e)[:120]})"
    return graph.replay, ""


def _compiled_step(engine, tokens, pos):
    def step():
        torch.compiler.cudagraph_mark_step_begin()  # each call a new step: outputs of the last may be overwritten
        return engine.decode(tokens, pos)

    for _ in range(3):  # compile + cudagraph warm-up and recording
        step()
    return step


def time_case(case: DecodeCase, mode: str, settings: Settings) -> dict:
    from tpblocks.infer import perfmodel as pm

    cfg, model = build_share(case, settings.device)
    context = min(CONTEXT, cfg.max_seq_len)
    t0 = time.perf_counter()
    engine = _engine(model, settings, mode == "compiled", context)
    tokens = torch.randint(0, cfg.vocab_size, (1, 1), device=settings.device)
    pos = torch.tensor([context - 1], device=settings.device)
    step, note = (
        (_compiled_step(engine, tokens, pos), "") if mode == "compiled" else _graph_step(engine, tokens, pos, settings)
    )
    ready_s = time.perf_counter() - t0
    ms = bench_ms(step, settings, rep_ms=10 if settings.dry_run else 300)
    held = sum(p.numel() * p.element_size() for p in model.parameters()) + engine.cache.nbytes()
    nbytes = pm.decode_bytes(cfg, devices=case.devices, context=context, precision=2).total
    del engine, model
    return {"label": case.label, "mode": mode, "flavor": case.flavor, "devices": case.devices, "context": context,
            "us_per_token": ms * 1e3, "bytes_formula": nbytes, "bytes_held": held, "setup_s": ready_s,
            "syncs": pm.syncs_for_config(cfg) if case.devices > 1 else 0, "note": note}  # fmt: skip


def predict_8gpu(rows: list[dict], mode: str, beta: float, t_syncs: tuple[float, ...]) -> list[dict]:
    """perfmodel's Eq. 9/10 with the measured per-GPU step as the memory term: t = t_measured + syncs x t_sync."""
    from tpblocks.infer import perfmodel as pm
    from tpblocks.models import get_flavor

    by_label = {r["label"]: r for r in rows if r["mode"] == mode}
    llama = next((r for r in by_label.values() if r["devices"] > 1 and get_flavor(r["flavor"]).arch == "llama"), None)
    if llama is None:
        return []
    hw = pm.get_hardware("h200")
    out = []
    for r in by_label.values():
        if r["devices"] == 1 or r is llama:
            continue
        for t_sync in t_syncs:
            hw_t = hw.replace(t_sync=t_sync)

            def measured(row, hw_t=hw_t):
                cfg = get_flavor(row["flavor"])
                pred = pm.predict(cfg, hw_t, devices=row["devices"], context=row["context"])
                return dataclasses.replace(pred, t_memory=row["us_per_token"] * 1e-6)

            base, cand = measured(llama), measured(r)
            formula = pm.speedup(
                pm.predict(get_flavor(llama["flavor"]), hw_t.replace(beta=beta), devices=llama["devices"],
                           context=llama["context"]),
                pm.predict(get_flavor(r["flavor"]), hw_t.replace(beta=beta), devices=r["devices"],
                           context=r["context"]),
            )  # fmt: skip
            out.append({"mode": mode, "model": r["label"], "vs": llama["label"], "t_sync_us": t_sync * 1e6,
                        "llama_t8_us": base.t_decode * 1e6, "model_t8_us": cand.t_decode * 1e6,
                        "predicted_speedup": pm.speedup(base, cand), "formula_speedup": formula})  # fmt: skip
    return out


def run(settings: Settings, results: dict, phase: str | None = "graph") -> dict:
    """One phase ("graph" or "compiled") over every model; the figures cover both phases measured so far."""
    from tpblocks.infer import perfmodel as pm

    if hasattr(torch._dynamo.config, "recompile_limit"):  # one cache entry per engine (engine.py)
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    copy = results.get("ceilings", {}).get("copy_GBps")
    beta = copy * 1e9 if copy else pm.get_hardware("h200").beta
    earlier = results.get("decode", {})
    rows, skipped = list(earlier.get("rows", [])), list(earlier.get("skipped", []))
    need = 1 if settings.dry_run else 60 if phase == "compiled" else 15  # a cold compile of a 22-layer step: ~1 min
    for case in cases(settings.dry_run):
        if not settings.budget.allows(need):
            skipped.append(f"{case.label} {phase}")
            continue
        try:
            row = time_case(case, phase, settings)
        except Exception as e:  # noqa: BLE001 - recorded, the next model still runs
            rows.append({"label": case.label, "mode": phase, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        row["roofline_us"] = row["bytes_formula"] / beta * 1e6
        row["of_roofline"] = row["roofline_us"] / row["us_per_token"]
        rows.append(row)
        if settings.cuda:
            torch.cuda.empty_cache()
    ok = [r for r in rows if "error" not in r]
    report = next(c for c in pm.report_checks() if c.quantity == "speedup over TinyLlama")
    predictions = []
    for mode in ("graph", "compiled"):
        predictions += predict_8gpu(ok, mode, beta, (2e-6, pm.get_hardware("h200").t_sync, 10e-6))
    table = [{"model": r["label"], "mode": r["mode"], "us/token": fmt(r.get("us_per_token")),
              "MB read": fmt(r.get("bytes_formula", 0) / 1e6), "roofline us": fmt(r.get("roofline_us")),
              "of roofline": fmt(r.get("of_roofline"), 2), "setup s": fmt(r.get("setup_s"), 2),
              "note": (r.get("error") or r.get("note") or "")[:70]} for r in rows]  # fmt: skip
    summary = [(f"decode {r['label']} [{r['mode']}] us/token", r["us_per_token"],
                 f"{r['of_roofline']:.2f} of roofline" + (f"; {r['note'][:50]}" if r["note"] else ""))
               for r in ok]  # fmt: skip
    summary += [(f"decode {r['label']} [{r['mode']}]", "failed", r["error"][:60]) for r in rows if "error" in r]
    summary += [(f"8-GPU speed-up {p['model']} [{p['mode']}], t_sync {p['t_sync_us']:.0f} us", p["predicted_speedup"],
                 f"report {report.printed:g}x, recomputed {report.formula:.2f}x, "
                 f"at the roofline {p['formula_speedup']:.2f}x")
                for p in predictions if p["t_sync_us"] == pm.get_hardware("h200").t_sync * 1e6]  # fmt: skip
    summary += [(f"decode {s}", "skipped", "time budget") for s in skipped]
    return {"context": CONTEXT, "beta_used_Bps": beta, "rows": rows, "predictions": predictions, "table": table,
            "prediction_table": [{k: fmt(v) if isinstance(v, float) else v for k, v in p.items()} for p in predictions],
            "report_speedup": report.printed, "recomputed_speedup": report.formula, "skipped": skipped,
            "summary": summary}  # fmt: skip
