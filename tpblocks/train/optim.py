"""AdamW with weight decay on weight matrices only.

Decay rule (one rule, applied by name and shape):
  decayed      every weight matrix: attention and FFN projections (stacked lane weights ``(l, in, out)`` too)
               and the token embedding, which is also the output head when tied (Table 6 ties them). This is
               nanoGPT/Llama practice: the embedding is a matrix like the others and the tied head needs the
               same regularisation as an untied one would get.
  not decayed  norm gains (RMSNorm ``weight``; lane norms ``attn_norm``/``ffn_norm`` are (lanes, width), so a
               plain ``dim >= 2`` test would wrongly decay them) and the delayed-communication reception
               ``gate`` (zero-initialised: decay would pull it back to "don't listen"), and any 1-D tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from tpblocks.config import OptimConfig

_NO_DECAY_LEAVES = ("gate",)


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """True when ``param`` (called ``name`` in ``model.named_parameters()``) gets weight decay."""
    if param.dim() < 2:
        return False
    leaf = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    if leaf in _NO_DECAY_LEAVES or "norm" in leaf or any("norm" in p for p in parts[:-1]):
        return False
    return True


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups, decayed and not; tied weights appear once (named_parameters dedups)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if is_decayed(name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW over ``model`` (also the client optimizer handed to DeepSpeed)."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    # foreach, asked for: torch picks it only for CUDA tensors, and on CPU its per-parameter loop costs a DTensor
    # dispatch per op per parameter (3.5x the step on a lane-sharded model). foreach gives the same bits as that
    # loop on CPU; fused would be faster still but rounds differently. One foreach call cannot mix DTensors and
    # plain tensors (a lane model's replicated KV heads and lane-shared norms stay plain): those take the loop.
    kinds = {type(p) for g in groups for p in g["params"]}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=len(kinds) == 1)


def apply_resumed_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, cfg: OptimConfig) -> list[str]:
    """After a resume restored the checkpoint's param groups and schedule: put this run's ``optim.*`` values back
    in force (they may change on resume; the schedule's shape is kept, scaled to the new peak ``lr``). Returns one
    ``"optim.x: old -> new"`` line per changed value; nothing is touched when nothing changed (bit-exact resume)."""
    wanted = {"weight_decay": cfg.weight_decay, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    changes: list[str] = []
    old_lr = scheduler.base_lrs[0]
    if any(base != cfg.lr for base in scheduler.base_lrs):
        changes.append(f"optim.lr: {old_lr:g} -> {cfg.lr:g}")
    for group in optimizer.param_groups:
        values = {**wanted, "weight_decay": 0.0} if group.get("name") == "no_decay" else wanted
        for key, value in values.items():
            current = tuple(group[key]) if key == "betas" else group[key]
            if current != value:
                if group.get("name") != "no_decay":  # its weight decay is always 0; report each change once
                    changes.append(f"optim.{key}: {current} -> {value}")
                group[key] = value
    if changes and changes[0].startswith("optim.lr"):
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes
