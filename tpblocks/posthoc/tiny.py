"""A tiny byte-level Llama trained on local text, so post-hoc perplexities mean something on a CPU.

``tiny_wikitext_llama`` trains (or loads from its cache directory) an 8-layer Llama on the first 90% of WikiText-2
and saves it as a Hugging Face ``LlamaForCausalLM`` directory: the post-hoc pipeline then loads it like any
downloaded Llama (``checkpoint.load_llama_family``). ``train_lm`` is the small next-token loop shared with LoRA
recovery (``lora.py``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tpblocks.models.config import ModelConfig
from tpblocks.models.model import TransformerLM

from .checkpoint import load_llama_family, save_llama


def tiny_config(n_layers: int = 8, hidden_size: int = 128, max_seq_len: int = 512) -> ModelConfig:
    """Byte-level Llama (vocab 256): GQA 4/2 heads, SwiGLU ~8/3 h rounded to a multiple of 32 (splits over 2 ranks)."""
    return ModelConfig(
        arch="llama",
        vocab_size=256,
        hidden_size=hidden_size,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden_size=32 * max(1, round(8 * hidden_size / 3 / 32)),
        n_layers=n_layers,
        max_seq_len=max_seq_len,
    )


def random_batches(ids: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator):
    """Endless (inputs, targets) batches of random contiguous windows of ``ids``."""
    if ids.numel() <= seq_len + 1:
        raise ValueError(f"text of {ids.numel()} tokens is too short for seq_len={seq_len}")
    while True:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=generator)
        win = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        yield win[:, :-1], win[:, 1:]


def train_lm(
    model: torch.nn.Module,
    ids: torch.Tensor,
    steps: int,
    lr: float,
    seq_len: int = 128,
    batch: int = 16,
    seed: int = 0,
    params=None,
    warmup: int = 20,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """AdamW + linear warmup + cosine decay on next-token loss; trains ``params`` (default: all). Returns losses."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: nothing would change")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    data = random_batches(ids, seq_len, batch, gen)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        x, y = next(data)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def tiny_wikitext_llama(
    text: str,
    cache_dir: str | os.PathLike | None,
    steps: int = 600,
    n_layers: int = 8,
    hidden_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> TransformerLM:
    """Train (or load from ``cache_dir``) a byte-level Llama on ``text``; saved as a HF Llama directory."""
    cfg = tiny_config(n_layers, hidden_size)
    # JSON round trip so the comparison with the cached file is like for like (tuples become lists).
    meta = json.loads(json.dumps({"steps": steps, "config": cfg.to_dict(), "seed": seed, "chars": len(text)}))
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        meta_path = cache_dir / "tpblocks_tiny.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("recipe") == meta:
            return load_llama_family(cache_dir)
    torch.manual_seed(seed)
    model = TransformerLM(cfg)
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    t0 = time.perf_counter()
    losses = train_lm(
        model, ids, steps=steps, lr=3e-3, seq_len=128, batch=16, seed=seed, progress=progress, desc="tiny llama"
    )
    if cache_dir is not None:
        save_llama(model, cache_dir)
        info = {
            "recipe": meta,
            "final_loss": sum(losses[-20:]) / 20,
            "train_s": time.perf_counter() - t0,
            "tokenizer": "bytes",
        }
        (cache_dir / "tpblocks_tiny.json").write_text(json.dumps(info, indent=2))
    return model.eval()


__all__ = ["random_batches", "tiny_config", "tiny_wikitext_llama", "train_lm"]
