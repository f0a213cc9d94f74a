"""The trainer's backends: the torch step (trainer=ddp / fsdp) and DeepSpeed ZeRO-1/2, behind one small interface.

``dist_env`` starts the process group through ``tpblocks.parallel.init_distributed`` (the one reader of the
torchrun / Slurm environment); without a launcher the run is a single process and no process group is created
(DDP is then the identity). gloo on CPU, nccl on CUDA.

A backend owns the forward/backward of one micro-batch and the optimizer update; the trainer owns the loop:

    for j in range(accum):  loss_j = backend.forward_backward(x, y, last=(j == accum - 1))
    check the (rank-averaged) loss is finite        # before any update: a NaN never reaches the weights
    grad_norm = backend.update()                    # clip + optimizer step + zero grads; the norm it clipped by

How the ranks share the work (the layout: ``tpblocks.parallel.ParallelDims``) and how gradients are synchronised
for it (DDP, lane groups, MGRIT, FSDP2) is ``tpblocks.parallel.parallelize``'s business; the torch backend only
runs the step over what it returns. Only DeepSpeed, whose engine owns the model, the optimizer and their
checkpoint, is a backend of its own.
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

from tpblocks.config import RunConfig, TrainConfig
from tpblocks.parallel.parallelize import Parallelized


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


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when the run computes in it (``TrainConfig.bf16_on``); None means plain fp32."""
    return torch.bfloat16 if train.bf16_on(device.type) else None


class TorchBackend:
    """trainer=ddp / trainer=fsdp: the model as ``tpblocks.parallel.parallelize`` placed it (DDP, lane groups,
    MGRIT or FSDP2: its ``Parallelized`` says how gradients are synchronised and clipped); bf16 through autocast,
    fp32 master weights."""

    def __init__(self, par: Parallelized, optimizer: torch.optim.Optimizer, cfg: RunConfig, env: DistEnv, accum: int):
        self.par, self.optimizer, self.env, self.accum = par, optimizer, env, accum
        self.grad_clip = cfg.optim.grad_clip
        self.dtype = autocast_dtype(cfg.train, env.device)

    def forward_backward(self, inputs_bs: torch.Tensor, targets_bs: torch.Tensor, last: bool) -> torch.Tensor:
        with self.par.micro_batch(last):
            with autocast(self.dtype, self.env.device):
                logits = self.par.forward(inputs_bs)
            loss = (self.par.loss or compute_loss)(logits, targets_bs)
            (loss / self.accum).backward()
        if last:
            self.par.sync_grads()
        return loss.detach()

    def update(self) -> float:
        """Clip to ``optim.grad_clip`` by the global norm, step, zero the gradients; returns that norm. A
        non-finite norm raises ``NonFiniteGradNorm`` before the step."""
        norm = self.par.clip_grad_norm_(self.grad_clip)
        if not math.isfinite(norm):
            raise NonFiniteGradNorm(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def checkpointed_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state goes into the checkpoint's dcp/ (tpblocks/train/sharded_state.py)."""
        return self.optimizer

    def check_resume(self, state: dict, path: Path) -> None:
        """dcp/ holds the weights and optimizer state of any ddp / fsdp layout; it cannot read DeepSpeed's."""
        if state["backend"] == "deepspeed":
            raise ValueError(_other_backend(path, state["backend"]))

    def save_extra(self, tmp: Path) -> None:  # everything is in dcp/ and trainer.pt
        pass

    def load_extra(self, ckpt: Path) -> None:
        pass


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The autocast context of ``autocast_dtype``'s answer (none for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _other_backend(path: Path, written_by: str) -> str:
    return (
        f"checkpoint {path} was written by trainer={written_by}, whose optimizer state this backend cannot read; "
        f"resume it with trainer={written_by}"
    )


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
            from tpblocks.parallel.dist import init_distributed

            init_distributed("nccl" if env.device.type == "cuda" else "gloo", group_of_one=True)
            for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
                os.environ.setdefault(name, value)  # DeepSpeed's engine asserts that a launcher set them
        self.module, self.optimizer, self.env = model, optimizer, env
        bf16 = cfg.train.bf16_on(env.device.type)
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

    def check_resume(self, state: dict, path: Path) -> None:
        """The engine's optimizer partitions are its own files, one per rank."""
        if state["world_size"] != self.env.world:
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} rank(s) but this run has {self.env.world}; "
                f"ZeRO optimizer partitions are per rank: resume trainer=deepspeed with the same number of ranks"
            )
        if state["backend"] != "deepspeed":
            raise ValueError(_other_backend(path, state["backend"]))

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


def build_backend(par: Parallelized, optimizer: torch.optim.Optimizer, cfg: RunConfig, env: DistEnv, accum: int):
    """The DeepSpeed engine around the placed model, or the torch step over it (ddp / fsdp)."""
    if cfg.trainer.backend == "deepspeed":
        if par.dims.mode != "ddp":  # RunConfig refuses these; a guard for direct callers
            raise ValueError(f"trainer=deepspeed does not support the {par.dims.mode!r} layout; use trainer=ddp")
        return DeepSpeedBackend(par.module, optimizer, cfg, env, accum)
    return TorchBackend(par, optimizer, cfg, env, accum)
