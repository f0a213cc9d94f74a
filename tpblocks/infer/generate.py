"""KV-cache generation for every model of the zoo: one prefill pass over the prompt, then one token per step.

The same loop serves one process and a lane group: after ``tpblocks.parallel.shard_model`` every rank of the
group holds its lanes / shards, runs the same forward (the model's communication points do the collectives)
and gets the same logits, because the head is replicated and every merge is an all-gather / all-reduce.
Sampling uses a ``torch.Generator`` seeded identically on every rank; on top of that the sampled token is
broadcast from the group's first rank (``broadcast_tokens``, on by default in a group) so a one-ulp logit
difference between ranks can never make them diverge. Greedy decoding with ``broadcast_tokens=False`` sends
nothing beyond the model's own collectives, which is what the decode benchmark times.

Sampling: ``temperature == 0`` is greedy (argmax); otherwise logits / temperature, optionally restricted to the
``top_k`` largest, then one draw from the softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from tpblocks.models.kv_cache import KVCache


def _validate(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, temperature: float, top_k: int | None):
    cfg = model.cfg
    if len(prompt) == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the BOS id)")
    bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary 0..{cfg.vocab_size - 1}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_seq_len={cfg.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be in 1..vocab_size={cfg.vocab_size} (or None for no cut)")


def sample_next(
    logits_v: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from the last position's logits (vocab,)."""
    logits_v = logits_v.float()
    if temperature == 0.0:
        return int(torch.argmax(logits_v))
    logits_v = logits_v / temperature
    if top_k is not None and top_k < logits_v.numel():
        kth = torch.topk(logits_v, top_k).values[-1]
        logits_v = logits_v.masked_fill(logits_v < kth, float("-inf"))
    probs = torch.softmax(logits_v, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _token_broadcaster(model: nn.Module) -> Callable[[int], int] | None:
    """Broadcast from the lane group's first rank, when the model's communicator spans several processes."""
    comm = getattr(model, "comm", None)
    group = getattr(comm, "group", None)
    if group is None or getattr(comm, "lane_world", 1) <= 1:
        return None
    import torch.distributed as dist  # only reached when a process group exists

    src = dist.get_global_rank(group, 0)

    def broadcast(token: int) -> int:
        t = torch.tensor([token], dtype=torch.long)
        dist.broadcast(t, src=src, group=group)
        return int(t)

    return broadcast


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    broadcast_tokens: bool | None = None,
    progress: bool = False,
) -> list[int]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``; returns the new tokens only.

    ``seed`` seeds the sampler (same seed, same tokens); stops early after ``eos_id``. In a lane group every
    rank must call this with the same arguments; ``broadcast_tokens`` (default: on when the model spans
    several processes) makes rank 0's choice the group's.
    """
    prompt = [int(t) for t in prompt_ids]
    _validate(model, prompt, max_new_tokens, temperature, top_k)
    if max_new_tokens == 0:
        return []
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    generator.manual_seed(0 if seed is None else seed)
    broadcast = _token_broadcaster(model) if broadcast_tokens in (None, True) else None
    if broadcast_tokens and broadcast is None and getattr(getattr(model, "comm", None), "lane_world", 1) > 1:
        raise ValueError("broadcast_tokens=True needs a communicator with a process group (MeshComm)")

    cache = KVCache(model.n_cache_slots, len(prompt) + max_new_tokens)
    tokens_bs = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    steps = range(max_new_tokens)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="decode", unit="tok")
    for _ in steps:
        logits_bsv = model(tokens_bs, cache)  # prefill on the first step, one token afterwards
        token = sample_next(logits_bsv[0, -1].cpu(), temperature, top_k, generator)
        if broadcast is not None:
            token = broadcast(token)
        out.append(token)
        if eos_id is not None and token == eos_id:
            break
        tokens_bs = torch.tensor([[token]], dtype=torch.long, device=device)
    return out
