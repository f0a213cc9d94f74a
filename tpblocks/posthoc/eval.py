"""Evaluating a (parallelised) model: strided sliding-window perplexity and measured KV-cache decode.

Perplexity follows the usual strided evaluation of fixed-context models: windows of ``window`` tokens start every
``stride`` tokens; each window scores only the tokens not scored by the previous one, so every token after the
first is predicted exactly once, with at least ``window - stride`` tokens of context (except near the start).

Decode: prefill a prompt, then time greedy one-token steps through the KV cache. Syncs per token are read from
the model's ``Communicator`` counter over the decode steps, i.e. the blocking all-reduces a tensor-parallel run
of the same schedule would make.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) for strided windows over n tokens; token 0 is never scored (no context)."""
    out, prev_end = [], 1
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        n_scored = end - max(prev_end, begin + 1)
        if n_scored > 0:
            out.append((begin, end, n_scored))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    model,
    ids: list[int] | torch.Tensor,
    window: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Strided sliding-window perplexity of ``model`` (tokens -> logits) on one long token sequence."""
    stride = window // 2 if stride is None else stride
    if window < 2:
        raise ValueError(f"window={window} must be >= 2 tokens")
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must lie in [1, window={window}]")
    ids_t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids_t = ids_t[:max_tokens]
    if ids_t.numel() < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {ids_t.numel()}")
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is not None and window - 1 > max_len:
        raise ValueError(f"window={window} exceeds the model's max_seq_len={max_len} (+1); lower window")
    was_training = model.training
    model.eval()
    wins = _windows(ids_t.numel(), window, stride)
    # Same-length windows go in one batch; only the final window may be shorter.
    batches: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if batches and len(batches[-1]) < batch_size and (batches[-1][0][1] - batches[-1][0][0]) == (w[1] - w[0]):
            batches[-1].append(w)
        else:
            batches.append([w])
    total, count = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        x_bs = torch.stack([ids_t[b:e] for b, e, _ in batch])
        logits = model(x_bs[:, :-1]).float()
        nll_bs = F.cross_entropy(logits.transpose(1, 2), x_bs[:, 1:], reduction="none")
        for row, (_, _, n_scored) in enumerate(batch):
            total += nll_bs[row, -n_scored:].sum().item()
            count += n_scored
    model.train(was_training)
    return PerplexityResult(nll=total / count, n_tokens=count)


@dataclass(frozen=True, kw_only=True)
class DecodeResult:
    ms_per_token: float  # median wall time of one decode step
    syncs_per_token: float  # blocking communication points per decode step (Communicator counter)
    new_tokens: int


@torch.no_grad()
def measure_decode(
    model, prompt_ids: list[int] | torch.Tensor, new_tokens: int = 32, warmup: int = 3, repeats: int = 1
) -> DecodeResult:
    """Greedy KV-cache decode of ``new_tokens`` after the prompt; median step time and syncs per step."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens} must be >= 1")
    model.eval()
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1)
    need = prompt.shape[1] + warmup + new_tokens
    if need > model.cfg.max_seq_len:
        raise ValueError(f"prompt + warmup + new_tokens = {need} exceeds max_seq_len={model.cfg.max_seq_len}")
    times: list[float] = []
    syncs = 0
    for _ in range(repeats):
        cache = model.new_cache(need)
        tok = model(prompt, cache)[:, -1:].argmax(-1)
        for _ in range(warmup):
            tok = model(tok, cache)[:, -1:].argmax(-1)
        counter = model.comm.counter
        before = counter.blocking
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            tok = model(tok, cache)[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
        syncs += counter.blocking - before
    return DecodeResult(
        ms_per_token=1e3 * statistics.median(times),
        syncs_per_token=syncs / (new_tokens * repeats),
        new_tokens=new_tokens,
    )


__all__ = ["DecodeResult", "PerplexityResult", "measure_decode", "perplexity"]
