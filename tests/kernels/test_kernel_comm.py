"""GPU delayed all-reduce helper: the async path over gloo on CPU (NCCL and symmetric memory need GPUs)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import comm
from tpblocks.parallel.dist import free_port


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.full((3, 5), float(rank + 1))
        assert comm.pick_method(x) == "async"  # CPU tensor: symmetric memory never chosen
        pending = comm.delayed_all_reduce_start(x)
        busy = (torch.randn(64, 64) @ torch.randn(64, 64)).sum()  # work while the sum is in flight
        total = pending.wait()
        results[rank] = (total.clone(), x.clone(), bool(torch.isfinite(busy)), pending.is_completed())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_async_all_reduce_over_gloo():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), results), nprocs=world, join=True)
        results = dict(results)
    expected = torch.full((3, 5), 3.0)  # 1 + 2
    for rank in range(world):
        total, x, busy_ok, completed = results[rank]
        assert torch.equal(total, expected)
        assert torch.equal(x, torch.full((3, 5), float(rank + 1)))  # the input is not modified
        assert busy_ok and completed


def test_bad_method_and_unavailable_symmetric_memory_are_explained():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="method"):
        comm.pick_method(x, method="ring")
    assert not comm.symmetric_memory_available(x)
    with pytest.raises(RuntimeError, match="symm_mem"):
        comm.pick_method(x, method="symm_mem")
