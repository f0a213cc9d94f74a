"""An lm-evaluation-harness ``LM`` wrapping any tpblocks model (plain, parallelised, LoRA-adapted) and tokenizer.

The paper evaluates its parallelised models with the LM Evaluation Harness. ``TpblocksLM`` implements the three
request types so any task whose data is available locally runs through ``lm_eval.simple_evaluate``:

  loglikelihood(context, continuation)  sum of the continuation's token log-probs, and whether greedy decoding
                                        would have produced it (multiple-choice tasks)
  loglikelihood_rolling(text)           full log-likelihood of a document in non-overlapping windows
                                        (perplexity tasks such as wikitext)
  generate_until(context, gen_kwargs)   greedy KV-cache decoding until a stop string or ``max_gen_toks``

Contexts longer than the model's window are left-truncated, as lm-eval's own HF adapter does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from tqdm.auto import tqdm

from .eval import perplexity
from .text import Tokenizer


class TpblocksLM(LM):
    """lm-eval adapter. ``max_length`` defaults to the model's ``max_seq_len``."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        max_length: int | None = None,
        batch_size: int = 8,
        prefix_token_id: int | None = None,
        max_gen_toks: int = 64,
        progress: bool = False,
    ):
        super().__init__()
        self.model = model.eval()
        self.tok = tokenizer
        self.max_length = max_length or model.cfg.max_seq_len
        if self.max_length > model.cfg.max_seq_len:
            raise ValueError(f"max_length={self.max_length} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.progress = progress
        # Token that stands in for an empty context: BOS, else EOS, else a newline (byte tokenizers have neither).
        if prefix_token_id is None:
            prefix_token_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix_token_id is None:
            prefix_token_id = tokenizer.encode("\n")[-1]
        self.prefix_token_id = prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "name", type(self.tok).__name__)

    # ------------------------------------------------------------------ helpers
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces of the context belong to the continuation (lm-eval's convention for tokenizers that
        # merge a leading space into the next word).
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: encode the parts separately
            whole = ctx + self.tok.encode(continuation)
        cont = whole[len(ctx) :]
        if not ctx:
            ctx = [self.prefix_token_id]
        return ctx, cont

    @torch.no_grad()
    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        ids = (ctx + cont)[-(self.max_length + 1) :]
        x = torch.tensor(ids[:-1], dtype=torch.long).view(1, -1)
        logp = F.log_softmax(self.model(x).float()[0, -len(cont) :], dim=-1)
        target = torch.tensor(cont, dtype=torch.long)
        ll = logp.gather(-1, target[:, None]).sum().item()
        greedy = bool((logp.argmax(-1) == target).all())
        return ll, greedy

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=not self.progress):
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}: nothing to score")
            out.append(self._score(ctx, cont))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=not self.progress):
            ids = [self.prefix_token_id] + self.tok.encode(req.args[0])
            # Non-overlapping windows (stride = max_length) score every token once, as lm-eval's rolling windows do.
            res = perplexity(
                self.model, ids, window=self.max_length + 1, stride=self.max_length, batch_size=self.batch_size
            )
            out.append(-res.nll * res.n_tokens)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate_until", disable=not self.progress):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            ids = (self.tok.encode(context) or [self.prefix_token_id])[-(self.max_length - max_new) :]
            out.append(self._greedy(ids, max_new, until))
        return out

    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        max_new = min(max_new, self.max_length - len(ids))
        cache = self.model.new_cache(len(ids) + max_new)
        logits = self.model(torch.tensor(ids, dtype=torch.long).view(1, -1), cache)
        new: list[int] = []
        text = ""
        for _ in range(max_new):
            tok = int(logits[0, -1].argmax())
            if self.tok.eos_id is not None and tok == self.tok.eos_id:
                break
            new.append(tok)
            text = self.tok.decode(new)
            if any(s in text for s in until):
                break
            if len(new) < max_new:
                logits = self.model(torch.tensor([[tok]], dtype=torch.long), cache)
        for s in until:
            text = text.split(s)[0]
        return text


__all__ = ["TpblocksLM"]
