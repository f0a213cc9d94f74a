"""Layer-parallel MGRIT against the serial pass: forward+backward time of a deep, narrow layer stack.

Two gloo ranks on this machine (torch.multiprocessing spawn, one thread each). For every depth, the serial
forward+backward runs on rank 0 alone (one core; rank 1 idles at a barrier), then MGRIT on both ranks for
several iteration counts, all timed round-robin (median of repeats). Beside each measured ratio: the gradient's
relative error against serial, the a-posteriori estimate the monitor sees, and the *analytic* speed-up of the
same configuration for P processors (tpblocks.parallel.mgrit.cost: layer evaluations on the critical path,
messages ignored).

What 2 cores can show (read this before the table): MGRIT trades serial steps for more total work (relaxation,
restriction, the coarse solve, the adjoint's VJPs), so with P = 2 its critical path is *longer* than the serial
pass for every setting (the analytic P=2 column is < 1): the method pays off only for P >> cf. On top of that
each iteration costs several gloo messages of ~0.1-1 ms on an idle machine and far more when other processes
share the two cores. The measured ratio on 2 ranks is therefore expected to be < 1; it checks the cost model's
direction and the implementation's overheads, not the method's promise.

    python benchmarks/mgrit.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` and `tpblocks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from tpblocks.models import ModelConfig, build_model  # noqa: E402
from tpblocks.parallel.mgrit import MGRITConfig, MGRITStack, analytic_speedup  # noqa: E402

WIDTH, HEADS, KV_HEADS, BATCH, SEQ = 32, 4, 2, 4, 32
CF, LEVELS, RELAX = 4, 2, "F"
ANALYTIC_P = (2, 4, 16, 64)  # processor counts for the cost model (a rank needs >= 1 layer)


def _stack_model(depth: int):
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS,
                      n_layers=depth, max_seq_len=SEQ, init_std=0.05)  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg)


def _fwd_bwd(stack: MGRITStack, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    params = list(stack.parameters())
    y = stack(x)
    return list(torch.autograd.grad(y, [x, *params], gy))


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float((fa - fb).norm() / fb.norm())


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _ping_pong_ms(rank: int, numel: int, repeats: int = 50) -> float:
    buf = torch.zeros(numel)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
    return (time.perf_counter() - t0) / repeats * 1e3


TRAIN_RUNS = {  # name -> layer_parallel block; same model, data, seed and optimizer for all
    "serial": {"enabled": False},
    "mgrit iters=1, no monitor": {"enabled": True, "cf": 2, "iters": 1, "relax": "F", "monitor": False},
    "mgrit iters=1 + monitor": {"enabled": True, "cf": 2, "iters": 1, "relax": "F", "grad_tol": 0.05, "max_iters": 4,
                                "check_every": 10, "plateau_window": 5},
}  # fmt: skip


def _training_rows(steps: int) -> list[dict]:
    """Train a tiny 8-layer Llama (init_std 0.1: MGRIT needs several iterations) on one fixed batch."""
    import torch.nn.functional as F

    from tpblocks.parallel.mgrit import apply_layer_parallel

    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS,
                      n_layers=8, max_seq_len=SEQ, init_std=0.1)  # fmt: skip
    tok = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    rows, serial_final = [], None
    for name, lp_cfg in TRAIN_RUNS.items():
        torch.manual_seed(0)
        model = build_model(cfg)
        lp = apply_layer_parallel(model, lp_cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

        def loss_fn(model=model):
            return F.cross_entropy(model(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())

        t0, losses = time.perf_counter(), []
        for step in range(steps):
            loss = loss_fn()
            loss.backward()
            if lp.should_check(step):
                lp.measure_grad_error(loss_fn)
            lp.step_end(step, loss.item())
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        with torch.no_grad():
            final = loss_fn().item()  # evaluated serially (eval_serial), so the runs are compared exactly
        serial_final = final if serial_final is None else serial_final
        rows.append({
            "run": name, "first_loss": round(losses[0], 4), "final_loss": round(final, 4),
            "gap_vs_serial": f"{(final - serial_final) / serial_final:+.2%}",
            "ms_per_step": round((time.perf_counter() - t0) / steps * 1e3, 1),
            "monitor_events": "; ".join(f"step {e['step']}: {e['action']}" for e in lp.monitor.events) or "-",
        })  # fmt: skip
    return rows


def _worker(rank, world, init_file, out_file, depths: list[int], iters: list[int], repeats: int, train_steps: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))  # fmt: skip
    rows = []
    try:
        rtt = _ping_pong_ms(rank, BATCH * SEQ * WIDTH)
        for depth in depths:
            model = _stack_model(depth)
            call = lambda m, h, model=model: type(m).forward(m, h, model.comm)  # noqa: E731
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(BATCH, SEQ, WIDTH, generator=gen).requires_grad_(True)
            gy = torch.randn(BATCH, SEQ, WIDTH, generator=gen)
            serial = MGRITStack(model.stages, MGRITConfig(), call=call, link=None)
            serial.serial = True  # the plain loop under ordinary autograd, on this rank only
            g_ref = _fwd_bwd(serial, x, gy)
            stacks, accuracy = {}, {}
            for it in iters:
                cfg = MGRITConfig(levels=LEVELS, cf=CF, iters=it, relax=RELAX, max_iters=max(8, it))
                stacks[it] = MGRITStack(model.stages, cfg, call=call)
                g = _fwd_bwd(stacks[it], x, gy)  # also the warm-up
                accuracy[it] = (_rel(g, g_ref), stacks[it].last_stats["grad_err_est"])
            # Round-robin (serial, then each iteration count, repeated) so load drifts hit all alike.
            times: dict = {"serial": [], **{it: [] for it in iters}}
            for _ in range(repeats):
                dist.barrier()
                if rank == 0:  # serial on one rank while the other waits at the barrier
                    times["serial"].append(_time_once(lambda s=serial, x=x, gy=gy: _fwd_bwd(s, x, gy)))
                for it in iters:
                    dist.barrier()
                    times[it].append(_time_once(lambda s=stacks[it], x=x, gy=gy: _fwd_bwd(s, x, gy)))
            t_serial = statistics.median(times["serial"]) if rank == 0 else 0.0
            for it in iters:
                t_mgrit = statistics.median(times[it])
                err, est = accuracy[it]
                a = {p: round(analytic_speedup(depth, p, cf=CF, levels=LEVELS, iters=it, relax=RELAX)["speedup"], 2)
                     if p <= depth else "n/a" for p in ANALYTIC_P}  # fmt: skip
                rows.append({
                    "depth": depth, "iters": it, "serial_ms": round(t_serial * 1e3, 1),
                    "mgrit_2r_ms": round(t_mgrit * 1e3, 1), "measured_x": round(t_serial / t_mgrit, 2),
                    **{f"analytic_P{p}": a[p] for p in ANALYTIC_P},
                    "grad_rel_err": f"{err:.1e}", "grad_err_est": f"{est:.1e}",
                })  # fmt: skip
        train_rows = _training_rows(train_steps)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"rows": rows, "training": train_rows, "ping_pong_ms": rtt}, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two depths, two iteration counts (about a minute)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    depths = [16, 32] if args.quick else [16, 32, 64]
    iters = [1, 2] if args.quick else [1, 2, 4]
    repeats = 3 if args.quick else 5
    train_steps = 20 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(2, init_file, out_file, depths, iters, repeats, train_steps), nprocs=2, join=True)
        with open(out_file) as f:
            result = json.load(f)
    info = {**machine_info(), "load_average_1m": round(os.getloadavg()[0], 2)}
    setup = (f"stack of Llama decoder layers, width {WIDTH}, batch {BATCH} x seq {SEQ}, fp32; MGRIT levels={LEVELS} "
             f"cf={CF} relax={RELAX}, final serial sweep; 2 gloo ranks x 1 thread vs serial on 1 rank")  # fmt: skip
    print_table(result["rows"], f"MGRIT forward+backward vs serial ({setup})")
    print(
        f"  gloo ping-pong of one boundary state ({BATCH * SEQ * WIDTH} fp32): "
        f"{result['ping_pong_ms']:.2f} ms round trip"
    )
    print_table(
        result["training"],
        f"Training a tiny 8-layer model on 2 ranks, {train_steps} AdamW steps on one batch (final loss: serial eval)",
    )
    print(f"  machine: {info}")
    print("  measured_x = serial / MGRIT on 2 ranks; analytic_P* = cost-model speed-up for P ranks (no messages).")
    if args.json:
        write_json(args.json, {"setup": setup, "machine": info, **result})


if __name__ == "__main__":
    main()
