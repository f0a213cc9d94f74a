"""NCCL and the delayed all-reduce of ``kernels/comm.py`` on a one-rank process group (one GPU in a lease).

One rank cannot measure NVLink's t_sync, but it does check what never ran: NCCL initialises, the async path and
(where this torch has it) the symmetric-memory one-shot path return the right sum (on one rank: the input)
through CUDA streams and events, and how long a small all-reduce takes to issue and complete on one GPU (a
floor under t_sync, not t_sync). The dry run does the same over gloo on the CPU.
"""

from __future__ import annotations

import torch

from .common import Settings, bench_ms


def run(settings: Settings, results: dict, phase: str | None = None) -> dict:
    import torch.distributed as dist

    from kernels import comm

    backend = "nccl" if settings.cuda else "gloo"
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; the one-rank check needs its own")
    if settings.cuda:
        torch.cuda.set_device(settings.device.index or 0)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    try:
        gen = torch.Generator(device=settings.device).manual_seed(settings.seed)
        for method in ("async", "symm_mem"):
            x = torch.randn(4096, device=settings.device, generator=gen)  # a decode-sized hidden state (16 KB fp32)
            row = {"method": method, "backend": backend, "correct": None, "us": None, "error": ""}
            try:
                got = comm.delayed_all_reduce_start(x.clone(), method=method).wait()
                row["correct"] = bool(torch.equal(got, x))
                row["us"] = 1e3 * bench_ms(lambda x=x, m=method: comm.delayed_all_reduce(x, method=m), settings,
                                           rep_ms=5 if settings.dry_run else 50)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - symm_mem missing on CPU / in this build: said, the other still runs
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    finally:
        dist.destroy_process_group()
    summary = [(f"{backend} 1-rank all-reduce [{r['method']}] us", r["us"], "correct" if r["correct"] else "WRONG SUM")
               if not r["error"] else (f"{backend} 1-rank all-reduce [{r['method']}]", "n/a", r["error"][:60])
               for r in rows]  # fmt: skip
    return {"rows": rows, "table": rows, "summary": summary}
