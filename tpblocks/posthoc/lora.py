"""Recovery of a parallelised model with LoRA adapters (``peft``), as both seeds do after parallelising.

``peft.inject_adapter_in_model`` adds low-rank adapters to any ``nn.Linear`` whose module name ends with one of
``targets`` — here tpblocks' own names (``wq wk wv wo w_gate w_up w_down``), so no Hugging Face model class is
needed and the parallel stages (which hold the original layers) are adapted in place. A layer reused by every
pass of an iterative group shares one adapter across its passes.

QLoRA (4-bit NF4 base weights, Dettmers et al.) needs ``bitsandbytes`` and a CUDA device; where either is
missing ``add_lora(..., qlora=True)`` raises a ``RuntimeError`` saying which, and plain LoRA is the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .tiny import train_lm

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Adapter shape and the recovery run. The paper used rank 16 on every transformation."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=TARGETS)
    steps: int = 200
    lr: float = 3e-3
    seq_len: int = 128
    batch: int = 16
    seed: int = 0
    qlora: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if not self.targets:
            raise ValueError(f"targets must name at least one linear layer, e.g. {TARGETS}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; tpblocks' linear layers are {TARGETS}")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"steps={self.steps} and lr={self.lr} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")


def qlora_unavailable_reason() -> str | None:
    """None when QLoRA can run here, else why not."""
    if not torch.cuda.is_available():
        return "QLoRA needs a CUDA device (4-bit bitsandbytes kernels); none is visible — use qlora=False (plain LoRA)"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "QLoRA needs bitsandbytes: pip install -c constraints.txt bitsandbytes — or use qlora=False"
    return None


def _quantise_4bit_(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Replace the target linears by bitsandbytes NF4 ``Linear4bit`` on CUDA (QLoRA's frozen base)."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(module, child_name, q.cuda())


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject LoRA adapters in place; freezes every non-adapter parameter. Returns the model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if cfg.qlora:
        reason = qlora_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        model.cuda()  # NF4 weights and their kernels live on the GPU; the rest of the model follows
        _quantise_4bit_(model, cfg.targets)
    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = set(cfg.targets) - found
    if missing == set(cfg.targets):
        raise ValueError(f"none of the LoRA targets {cfg.targets} is a linear layer of this model (it has {found})")
    targets = [t for t in cfg.targets if t in found]
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def recover_with_lora(model: nn.Module, train_ids: torch.Tensor, cfg: LoraConfig, progress: bool = True) -> list[float]:
    """Add adapters to ``model`` (in place) and fine-tune them on ``train_ids``; returns the training losses."""
    add_lora(model, cfg)
    params = lora_parameters(model)
    return train_lm(
        model,
        train_ids,
        steps=cfg.steps,
        lr=cfg.lr,
        seq_len=cfg.seq_len,
        batch=cfg.batch,
        seed=cfg.seed,
        params=params,
        progress=progress,
        desc="lora",
    )


__all__ = ["TARGETS", "LoraConfig", "add_lora", "lora_parameters", "qlora_unavailable_reason", "recover_with_lora"]
