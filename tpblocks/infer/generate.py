"""Text generation for every model of the zoo: a thin list-of-ids front end of the decode engine.

``generate(model, prompt_ids, n)`` runs ``tpblocks.infer.engine.DecodeEngine`` (static KV cache, eager by
default; ``compile=True`` for the compiled step) for one sequence. The same call serves one process and a
lane group: after ``tpblocks.parallel.shard_model`` every rank of the group holds its lanes / shards, runs the
same forward (the model's communication points do the collectives) and gets the same logits, because the
head is replicated and every merge is an all-gather / all-reduce. Sampling uses a generator seeded
identically on every rank; on top of that, when sampling (temperature > 0) the tokens are broadcast from the
group's first rank so a one-ulp logit difference between ranks can never make them diverge. Greedy decoding
sends nothing beyond the model's own collectives, which is what the decode benchmark times.

Sampling: ``temperature == 0`` is greedy (argmax); otherwise logits / temperature, optionally restricted to the
``top_k`` largest, then one draw from the softmax (``engine.sample``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .engine import DecodeEngine, sample


def sample_next(
    logits_v: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from the last position's logits (vocab,) (``engine.sample`` for one row, as an int)."""
    return int(sample(logits_v[None], temperature, top_k, generator)[0])


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    progress: bool = False,
    compile: bool = False,
) -> list[int]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``; returns the new tokens only.

    ``seed`` seeds the sampler (same seed, same tokens); stops early after ``eos_id``. In a lane group every
    rank must call this with the same arguments.
    """
    prompt = [int(t) for t in prompt_ids]
    if len(prompt) == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the BOS id)")
    if len(prompt) + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_seq_len={model.cfg.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    # The other arguments are checked by the engine (DecodeEngine.check).
    engine = DecodeEngine(model, batch=1, max_seq_len=max(1, len(prompt) + max_new_tokens), compile=compile)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_new_tokens, desc="decode", unit="tok")
    out = engine.generate(
        torch.tensor([prompt]), max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, eos_id=eos_id,
        on_token=(lambda _: bar.update(1)) if bar is not None else None,
    )  # fmt: skip
    if bar is not None:
        bar.close()
    tokens = out[0].tolist()
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    return tokens
