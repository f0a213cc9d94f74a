"""Measure the decode-time model's two machine constants here: t_sync and the memory bandwidth beta.

* ``t_sync``: the latency of one small all-reduce over the current process group (the report's Eq. 7: at
  batch 1 a hidden state is a few KB, so a sync is its latency, not its transfer). Timed back to back so the
  ranks stay in step; the median is kept (p10/p90 show the spread, which on a shared CPU is wide).
* ``beta``: bytes per second of a matrix-vector product over a weight of ``beta_bytes`` (what a batch-1
  decode does with every weight), measured by all ranks *at the same time* so that ranks sharing a memory
  bus see the bandwidth they will get during a distributed decode. A plain copy is reported too.

    python -m tpblocks.infer.calibrate                       # spawns 2 gloo ranks itself
    torchrun --nproc_per_node=2 -m tpblocks.infer.calibrate --json calib.json

``Calibration.hardware()`` turns the result into a ``perfmodel.Hardware`` preset for this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tpblocks.parallel.dist import free_port

from .perfmodel import Hardware


@dataclass(frozen=True)
class Calibration:
    t_sync: float  # s, median small all-reduce (0 for a single process)
    t_sync_p10: float
    t_sync_p90: float
    sync_bytes: int
    world: int
    backend: str
    beta: float  # bytes/s, median matvec weight read per rank, all ranks concurrently
    beta_copy: float  # bytes/s (read + write) of a tensor copy
    beta_bytes: int
    threads: int
    host: str
    t_sync_in_compute: float = 0.0  # s, extra cost of a sync placed after a layer's matvec (measure_sync_in_compute)

    def hardware(self, name: str = "this_machine", in_compute: bool = False) -> Hardware:
        """A preset; ``in_compute`` uses the sync cost measured between matvecs instead of back to back."""
        return Hardware(
            name=name,
            beta=self.beta,
            t_sync=self.t_sync_in_compute if in_compute else self.t_sync,
            source=f"measured on {self.host}: {self.world} {self.backend} ranks x {self.threads} thread(s), "
            f"{self.sync_bytes} B all-reduce, {self.beta_bytes / 2**20:.0f} MiB matvec",
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure_t_sync(group=None, nbytes: int = 4096, iters: int = 300, warmup: int = 30) -> tuple[float, float, float]:
    """(median, p10, p90) seconds of an all-reduce of ``nbytes`` fp32 over ``group``; zeros without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0.0, 0.0, 0.0
    x = torch.ones(max(1, nbytes // 4))
    times = []
    dist.barrier(group=group)
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        dist.all_reduce(x, group=group)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        x.fill_(1.0)
    # Agree across ranks: the mean of the ranks' medians (each rank waits for the slowest, so they are close).
    stats = torch.tensor([statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9)], dtype=torch.float64)
    dist.all_reduce(stats, group=group)
    stats /= dist.get_world_size(group)
    return float(stats[0]), float(stats[1]), float(stats[2])


def measure_sync_in_compute(group=None, work_bytes: int = 2 * 2**20, nbytes: int = 4096, iters: int = 100) -> float:
    """Extra seconds per sync when each sync follows a matvec over ``work_bytes`` (a layer's weights), as in a
    decode step: mean of (matvec + all-reduce) minus mean of matvec alone, rounds interleaved.

    Unlike the back-to-back ``measure_t_sync``, the ranks arrive at each sync at slightly different times, so
    this includes the wait for the slower rank (jitter, other processes) that a real decode pays at every sync.
    Returns 0 without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0.0
    cols = 1024
    w = torch.randn(max(1, work_bytes // (4 * cols)), cols)
    v = torch.randn(cols)
    x = torch.ones(max(1, nbytes // 4))
    with_sync, alone = [], []
    dist.barrier(group=group)
    for _ in range(max(1, iters // 10)):
        for synced, out in ((True, with_sync), (False, alone)):
            t0 = time.perf_counter()
            for _ in range(10):
                torch.mv(w, v)
                if synced:
                    dist.all_reduce(x, group=group)
            out.append((time.perf_counter() - t0) / 10)
            dist.barrier(group=group)
    extra = torch.tensor([statistics.median(with_sync) - statistics.median(alone)], dtype=torch.float64)
    dist.all_reduce(extra, group=group)
    return max(0.0, float(extra) / dist.get_world_size(group))


def measure_beta(nbytes: int = 128 * 2**20, iters: int = 15, warmup: int = 3, group=None) -> tuple[float, float]:
    """(matvec read bandwidth, copy read+write bandwidth) in bytes/s, medians; all ranks measure together."""
    cols = 4096
    rows = max(1, nbytes // (4 * cols))
    w = torch.randn(rows, cols)
    x = torch.randn(cols)
    src, dst = w.view(-1), torch.empty(rows * cols)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

    def timed(fn) -> float:
        times = []
        if distributed:
            dist.barrier(group=group)
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_mv = timed(lambda: torch.mv(w, x))
    t_copy = timed(lambda: dst.copy_(src))
    return w.nbytes / t_mv, 2 * w.nbytes / t_copy


def calibrate(
    group=None, beta_bytes: int = 128 * 2**20, sync_bytes: int = 4096, iters: int = 300, work_bytes: int | None = None
) -> Calibration:
    """Measure t_sync over ``group`` (default: the world) and beta on this rank; every rank gets the result."""
    distributed = dist.is_available() and dist.is_initialized()
    t_sync, p10, p90 = measure_t_sync(group, sync_bytes, iters=iters, warmup=max(5, iters // 10))
    beta, beta_copy = measure_beta(beta_bytes, group=group)
    in_compute = measure_sync_in_compute(group, work_bytes or max(4096, beta_bytes // 16), sync_bytes, iters)
    world = dist.get_world_size(group) if distributed else 1
    if distributed and world > 1:
        b = torch.tensor([beta, beta_copy], dtype=torch.float64)
        dist.all_reduce(b, group=group)
        beta, beta_copy = (float(v) / world for v in b)
    return Calibration(
        t_sync=t_sync, t_sync_p10=p10, t_sync_p90=p90, sync_bytes=sync_bytes, world=world,
        backend=dist.get_backend(group) if distributed else "none", beta=beta, beta_copy=beta_copy,
        beta_bytes=beta_bytes, threads=torch.get_num_threads(), host=platform.node() or "unknown",
        t_sync_in_compute=in_compute,
    )  # fmt: skip


# ---------------------------------------------------------------------- command line
def _spawned(rank: int, world: int, port: int, kwargs: dict, out: str) -> None:
    torch.set_num_threads(1)  # as torchrun does: one thread per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = calibrate(**kwargs)
        if rank == 0:
            Path(out).write_text(json.dumps(result.as_dict()))
    finally:
        dist.destroy_process_group()


def spawn_calibration(world: int = 2, **kwargs) -> Calibration:
    """Run ``calibrate`` on ``world`` freshly spawned gloo ranks (for use outside torchrun)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "calibration.json")
        mp.spawn(_spawned, args=(world, free_port(), kwargs, out), nprocs=world, join=True)
        return Calibration(**json.loads(Path(out).read_text()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun")
    parser.add_argument("--beta-mib", type=float, default=128, help="weight size for the bandwidth read (MiB)")
    parser.add_argument("--sync-bytes", type=int, default=4096, help="all-reduce size for t_sync (bytes)")
    parser.add_argument("--iters", type=int, default=300, help="all-reduces timed")
    parser.add_argument("--json", type=str, default=None, help="write the calibration here")
    args = parser.parse_args(argv)
    kwargs = dict(beta_bytes=int(args.beta_mib * 2**20), sync_bytes=args.sync_bytes, iters=args.iters)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from tpblocks.parallel import destroy_distributed, init_distributed

        rank, _ = init_distributed()
        try:
            result = calibrate(**kwargs)
        finally:
            destroy_distributed()
        if rank != 0:
            return
    else:
        result = spawn_calibration(args.world, **kwargs) if args.world > 1 else calibrate(**kwargs)
    hw = result.hardware()
    p10, p90 = result.t_sync_p10 * 1e6, result.t_sync_p90 * 1e6
    print(f"t_sync  {result.t_sync * 1e6:8.1f} us  (p10 {p10:.1f}, p90 {p90:.1f};"
          f" {result.world} x {result.backend}, {result.sync_bytes} B; "
          f"{result.t_sync_in_compute * 1e6:.1f} us when placed between matvecs)")  # fmt: skip
    print(f"beta    {result.beta / 1e9:8.2f} GB/s matvec read   ({result.beta_copy / 1e9:.2f} GB/s copy r+w, "
          f"{result.beta_bytes / 2**20:.0f} MiB, {result.threads} thread(s) per rank)")  # fmt: skip
    print(f"preset  {hw}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"calibration": result.as_dict(), "hardware": hw.__dict__}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
