"""Data-parallel backends for the trainer: plain/DDP and DeepSpeed ZeRO-1/2, behind one small interface.

``dist_env`` starts the process group through ``tpblocks.parallel.init_distributed`` (the one reader of the
torchrun / Slurm environment); without a launcher the run is a single process and no process group is created
(DDP is then the identity). gloo on CPU, nccl on CUDA.

A backend owns the forward/backward of one micro-batch and the optimizer update; the trainer owns the loop:

    for j in range(accum):  loss_j = backend.forward_backward(x, y, last=(j == accum - 1))
    check the (rank-averaged) loss is finite        # before any update: a NaN never reaches the weights
    grad_norm = backend.update()                    # clip + optimizer step + zero grads; the norm it clipped by

``Layout`` says how the ranks share the work (``layout_for``): ``ddp`` = every rank a data-parallel replica;
``lane`` = (dp, lane) mesh, the model sharded over the lane axis, gradients averaged over the dp group only;
``mgrit`` = layer-parallel MGRIT over all ranks, every rank reads the same batch and already holds the full
gradient (no averaging). ``data_rank`` / ``data_world`` are the coordinates the data loader uses.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tpblocks.config import RunConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def dist_env(device: str = "auto", timeout_s: int = 600) -> DistEnv:
    """The process group (``tpblocks.parallel.init_distributed``) and this rank's coordinates and device."""
    from tpblocks.parallel.dist import init_distributed, local_rank

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    rank, world = init_distributed("nccl" if use_cuda else "gloo", timeout_s)
    dev = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    return DistEnv(rank=rank, world=world, local_rank=local_rank(), device=dev)


class NonFiniteGradNorm(ArithmeticError):
    """The global gradient norm is NaN/inf: raised by ``update`` before the optimizer touches the weights."""

    def __init__(self, norm: float):
        super().__init__(f"gradient norm is {norm}")
        self.norm = norm


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def compute_loss(logits_bsv: torch.Tensor, targets_bs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits_bsv.float().flatten(0, 1), targets_bs.flatten())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for ``precision=bf16`` (or ``auto`` on CUDA); None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class Layout:
    """How the ranks split the work: see the module docstring."""

    mode: str  # "ddp" | "lane" | "mgrit"
    data_rank: int
    data_world: int
    dp: int = 1
    lane: int = 1
    dp_group: Any = None  # process group of this rank's data-parallel replicas (lane mode, dp > 1)
    mesh: Any = None  # DeviceMesh ("dp", "lane") in lane mode


def layout_for(cfg: RunConfig, env: DistEnv) -> Layout:
    """The layout of this run on this rank (builds the device mesh in lane mode: a collective)."""
    if cfg.layer_parallel.enabled:
        return Layout(mode="mgrit", data_rank=0, data_world=1)
    if cfg.parallel.lane == 1:
        return Layout(mode="ddp", data_rank=env.rank, data_world=env.world, dp=env.world)
    from tpblocks.parallel import ParallelDims

    dp, lane = cfg.parallel.dims(env.world)
    dims = ParallelDims(dp=dp, lane=lane, world_size=env.world)
    dp_rank, _ = dims.coords(env.rank)
    mesh = dims.build_mesh(env.device.type)
    return Layout(
        mode="lane", data_rank=dp_rank, data_world=dp, dp=dp, lane=lane, dp_group=mesh.get_group("dp"), mesh=mesh
    )


class DDPBackend:
    """torch DDP (identity for one process); bf16 through autocast, fp32 master weights.

    Lane mode: the sharded model is not wrapped; after the last micro-batch the gradients are averaged over the
    dp group (every lane rank of it holds the same shards) and clipped by the global norm of the sharded model.
    MGRIT mode: not wrapped and not averaged (the MGRIT stack all-reduces the layer gradients itself)."""

    name = "ddp"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: RunConfig,
        env: DistEnv,
        accum: int,
        layout: Layout | None = None,
    ):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.module, self.optimizer, self.env, self.accum = model, optimizer, env, accum
        self.layout = layout or Layout(mode="ddp", data_rank=env.rank, data_world=env.world, dp=env.world)
        self.grad_clip = cfg.optim.grad_clip
        self.dtype = autocast_dtype(cfg.train.precision, env.device)
        ids = [env.device.index] if env.device.type == "cuda" else None
        self.is_ddp = env.distributed and self.layout.mode == "ddp"
        self.wrapped = DDP(model, device_ids=ids) if self.is_ddp else model

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def forward_backward(self, inputs_bs: torch.Tensor, targets_bs: torch.Tensor, last: bool) -> torch.Tensor:
        # Gradients are all-reduced only on the last micro-batch (no_sync elsewhere): one sync per update.
        sync = contextlib.nullcontext() if (last or not self.is_ddp) else self.wrapped.no_sync()
        with sync:
            with self.autocast():
                logits = self.wrapped(inputs_bs)
            loss = compute_loss(logits, targets_bs)
            (loss / self.accum).backward()
        if last and self.layout.mode == "lane" and self.layout.dp > 1:
            from tpblocks.parallel import all_reduce_gradients

            all_reduce_gradients(self.module, self.layout.dp_group)  # same shards on every rank of the dp group
        return loss.detach()

    def update(self) -> float:
        """Clip to ``optim.grad_clip`` by the global norm, step, zero the gradients; returns that norm. A
        non-finite norm raises ``NonFiniteGradNorm`` before the step."""
        norm = self._clip_grad()
        if not math.isfinite(norm):
            raise NonFiniteGradNorm(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _clip_grad(self) -> float:
        if self.layout.mode == "lane":
            from tpblocks.parallel import clip_grad_norm_

            # The global norm over all lanes / shards, the same on every rank (a per-shard norm would clip each
            # lane rank by a different factor).
            return clip_grad_norm_(self.module, self.grad_clip if self.grad_clip > 0 else None)
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    @property
    def checkpointed_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state goes into the checkpoint's dcp/ (tpblocks/train/sharded_state.py)."""
        return self.optimizer

    def save_extra(self, tmp: Path) -> None:  # everything is in dcp/ and trainer.pt
        pass

    def load_extra(self, ckpt: Path) -> None:
        pass


def import_deepspeed():
    """Import DeepSpeed without its CPU JIT op build and its FutureWarnings (TOOLCHAIN.md §4).

    ``deepspeed.comm.torch.build_shm_op`` compiles a shared-memory all-reduce used only by CPU inference
    (40-70 s of gcc per fresh machine); training never calls it. ``import deepspeed.comm.torch as x`` would give
    the real torch package (deepspeed.comm re-exports a name ``torch``), hence importlib.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"deepspeed(\.|$)")
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


class DeepSpeedBackend:
    """DeepSpeed ZeRO-1/2 with the client torch AdamW (no "optimizer" section, so no fused-op JIT build)."""

    name = "deepspeed"
    tag = "state"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, env: DistEnv, accum: int):
        deepspeed = import_deepspeed()
        if not env.distributed:  # DeepSpeed always wants a process group, even for one rank
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(backend="nccl" if env.device.type == "cuda" else "gloo")
        self.module, self.optimizer, self.env = model, optimizer, env
        bf16 = autocast_dtype(cfg.train.precision, env.device) is not None
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
            "gradient_accumulation_steps": accum,
            "train_batch_size": cfg.train.micro_batch * accum * env.world,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": cfg.trainer.zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    def forward_backward(self, inputs_bs: torch.Tensor, targets_bs: torch.Tensor, last: bool) -> torch.Tensor:
        loss = compute_loss(self.engine(inputs_bs), targets_bs)
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        return loss.detach().float()

    def update(self) -> float:
        """``engine.step()``, which clips (gradient_clipping) and steps; returns the norm it clipped by. The engine
        computes that norm inside its step, so it cannot be checked before the update as DDP's is."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    checkpointed_optimizer = None  # ZeRO-partitioned: the engine writes it (save_extra)

    def load_extra(self, ckpt: Path) -> None:
        self.engine.load_checkpoint(
            str(ckpt / "deepspeed"), tag=self.tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )

    def save_extra(self, tmp: Path) -> None:
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag=self.tag)  # collective: every rank calls it

    def close(self) -> None:
        """Release the engine (its optimizer, hooks and communication buffers) before the process group goes."""
        destroy = getattr(self.engine, "destroy", None)  # DeepSpeed >= 0.14
        if destroy is not None:
            destroy()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_backend(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: RunConfig,
    env: DistEnv,
    accum: int,
    layout: Layout | None = None,
):
    if cfg.trainer.backend == "deepspeed":
        if layout is not None and layout.mode != "ddp":  # RunConfig refuses these; a guard for direct callers
            raise ValueError(f"trainer=deepspeed does not support the {layout.mode!r} layout; use trainer=ddp")
        return DeepSpeedBackend(model, optimizer, cfg, env, accum)
    return DDPBackend(model, optimizer, cfg, env, accum, layout)
