"""Process-group start-up from the torchrun environment, and the data-parallel gradient sum.

``init_distributed()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun, or by Slurm via
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``), picks gloo on CPU and nccl on CUDA, and returns
``(rank, world)``. Without those variables it returns ``(0, 1)`` and initialises nothing, so the same entry point
runs in one process; ``group_of_one=True`` starts a one-rank group then (DeepSpeed wants one even for one rank).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..models.layers import local


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as err:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from err
    return None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now: the rendezvous of a group this process starts or spawns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    backend: str | None = None, timeout_s: float = 600.0, *, group_of_one: bool = False
) -> tuple[int, int]:
    """Initialise the default process group from the launcher's environment; returns (rank, world).

    ``backend`` defaults to nccl when CUDA is available, else gloo. Idempotent: when a group already exists it
    only reports it. Under torchrun ``MASTER_ADDR``/``MASTER_PORT`` are set; under plain Slurm ``srun`` they must
    be exported by the job script (``MASTER_ADDR=$(hostname) MASTER_PORT=29500``). One process (no launcher, or a
    world of 1) gets a group only with ``group_of_one``, on a free local port.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    rank = _env_int("RANK", "SLURM_PROCID")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if world is None or world == 1:
        if group_of_one:
            dist.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                timeout=timedelta(seconds=timeout_s),
            )  # fmt: skip
        return 0, 1
    if rank is None:
        raise ValueError("WORLD_SIZE is set but RANK is not; launch with torchrun (it sets both)")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(
                f"{name} is not set; launch with torchrun, or export MASTER_ADDR and MASTER_PORT in the job script"
            )
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs
    )
    return rank, world


def local_rank() -> int:
    """This rank's index on its node (``LOCAL_RANK`` / ``SLURM_LOCALID``; 0 without a launcher)."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0


def local_device() -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, group=None, average: bool = True) -> None:
    """Sum (or average) every gradient over ``group`` (the ``dp`` axis), in one flat bucket per dtype.

    A minimal stand-in for DDP when a test or a small script wants explicit control; trainers may wrap the
    model in ``DistributedDataParallel(process_group=mesh["dp"].get_group())`` instead.
    """
    if not dist.is_initialized():
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    # A DTensor gradient (a lane shard, ``shard_model``) is summed over dp as its local tensor (same storage).
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for bucket in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def destroy_distributed() -> None:
    """Tear the default process group down if one exists (end of a script or a test worker)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
