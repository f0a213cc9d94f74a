"""Run a function on N gloo ranks with torch.multiprocessing (for multi-process tests).

    run_workers(my_check, world=2, args=(cfg_dict,))     # my_check(rank, world, *args) runs in each process

The worker must be a module-level function (it is pickled by name). Each rank runs with one thread, a
file-based rendezvous (no TCP port to collide on), and the process group torn down afterwards. An exception in
any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int = 2, args: tuple = ()) -> None:
    """Spawn ``world`` processes running ``fn(rank, world, *args)`` in a gloo process group; re-raise failures."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_entry, args=(world, init_file, fn, args), nprocs=world, join=True)
