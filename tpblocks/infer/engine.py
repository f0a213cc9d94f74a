"""The decode engine: prefill + a compiled one-token step over a static KV cache, for every model of the zoo.

What gpt-fast does for a dense Llama, for every schedule here (sharded over a lane group or not):
  * ``model.setup_cache(batch, max_seq_len, dtype, device)``: preallocated buffers, written at an ``input_pos``
    tensor; no shape and no Python int changes from step to step (``tpblocks.models.kv_cache.StaticKVCache``);
  * prefill and decode are separate functions; with ``compile=True`` decode is
    ``torch.compile(fullgraph=True)`` (``mode="reduce-overhead"`` on CUDA: CUDA graphs), prefill is compiled
    with a dynamic sequence length, so prompts of any length up to the cache size reuse one graph;
  * the model's communication points are functional collectives (``tpblocks.parallel.comm``), so the
    compiled step contains every merge, Megatron reduce and delayed lane sum;
  * sampling (greedy, temperature, top-k) runs on the device: no host round trip per token. A lane group
    broadcasts the sampled tokens from its first rank only when sampling could diverge (temperature > 0),
    never on the greedy path.

Sync counting: ``comm.counter`` counts eager forwards only (a Python side effect inside a compiled graph
would recompile every step); the syncs of one step are fixed by the config (``perfmodel.syncs_for_config``)
and ``tests/test_engine.py`` checks that the compiled graph holds exactly that many collectives.

Shapes: b batch, s prompt length, v vocabulary, n new tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..parallel.placement import local_parameters_

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``torch.bfloat16`` / None (keep the model's) -> a torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def sample(logits_bv: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None) -> torch.Tensor:
    """Next token ids (b,) from last-position logits (b, v), on their device, without a host sync.

    ``temperature == 0`` is greedy. Otherwise logits / temperature, cut to the ``top_k`` largest, and one draw
    from the softmax by the exponential race (argmax of p / Exp(1)), which needs no ``multinomial`` sync.
    """
    if temperature == 0.0:
        return logits_bv.argmax(-1)
    logits_bv = logits_bv.float() / temperature
    if top_k is not None and top_k < logits_bv.shape[-1]:
        kth_b1 = torch.topk(logits_bv, top_k, dim=-1).values[..., -1:]
        logits_bv = logits_bv.masked_fill(logits_bv < kth_b1, float("-inf"))
    probs_bv = torch.softmax(logits_bv, dim=-1)
    race_bv = torch.empty_like(probs_bv).exponential_(1.0, generator=generator)
    return (probs_bv / race_bv).argmax(-1)


def vocab_parallel_sample(
    local_bv: torch.Tensor, comm, temperature: float = 0.0, top_k: int | None = None, generator=None
) -> torch.Tensor:
    """``sample`` for a vocabulary-parallel head: each rank holds logits of rows [r V/G, (r+1) V/G) (b, V/G).

    Greedy and top-k gather only candidates, one tiny collective (``comm.vocab_gather``): each rank proposes
    its k best (value, global index) pairs, every rank picks from the k*G (greedy: k = 1). The full logits
    are gathered only for temperature sampling without a top-k cut. Ties go to the lowest index, as argmax.
    """
    b, shard = local_bv.shape
    if temperature > 0 and (top_k is None or top_k >= shard * comm.lane_world):
        return sample(comm.vocab_gather(local_bv), temperature, None, generator)
    k = 1 if temperature == 0 else min(top_k, shard)
    assert shard * comm.lane_world < 2**24, "global token ids travel as fp32, exact below 2^24"
    values_bk, index_bk = local_bv.float().topk(k, dim=-1)
    index_bk = index_bk + comm.lane_rank * shard
    cand_bg2k = comm.vocab_gather(torch.cat([values_bk, index_bk.float()], dim=-1)).view(b, -1, 2, k)
    values_bc, index_bc = cand_bg2k[:, :, 0].reshape(b, -1), cand_bg2k[:, :, 1].reshape(b, -1).long()
    if temperature == 0:
        return index_bc.gather(-1, values_bc.argmax(-1, keepdim=True)).squeeze(-1)
    picked_b = sample(values_bc, temperature, top_k, generator)  # position among the candidates
    return index_bc.gather(-1, picked_b[:, None]).squeeze(-1)


def _lane_group(model: nn.Module):
    """The process group of the model's communicator when it spans several processes, else None."""
    comm = getattr(model, "comm", None)
    group = getattr(comm, "group", None)
    return group if group is not None and getattr(comm, "lane_world", 1) > 1 else None


def _frozen(compiled_fn, freeze: bool):
    """``compiled_fn`` traced and compiled under inductor's ``freezing`` when ``freeze``. A global config patch
    around each call, not ``torch.compile(options=...)``: Dynamo decides whether parameters become graph constants
    while tracing (``torch._dynamo.utils.is_parameter_freezing``), before the options reach inductor, so with
    options alone the weights stay graph inputs and no linear is prepacked."""
    if not freeze:
        return compiled_fn

    @functools.wraps(compiled_fn)
    def call(*args):
        with torch._inductor.config.patch(freezing=True):
            return compiled_fn(*args)

    return call


class DecodeEngine:
    """Static-cache prefill and (optionally compiled) decode for ``model``; ``generate`` runs the loop.

    ``dtype`` casts the model in place (decode in bf16/fp16). ``compile``: compile decode (fullgraph) and
    prefill (dynamic length). ``mode``: the decode compile mode, default "reduce-overhead" on CUDA (CUDA
    graphs) and inductor's default on CPU; ``compile_prefill=False`` keeps prefill eager (benchmarks that only
    time decode steps save its compile). ``freeze`` (default: on when compiling on CPU) compiles with inductor's
    ``freezing``, its CPU inference path: the weights are folded into the graph as constants and the linears
    prepacked for MKL, which reads a (v, h) head about twice as fast as the plain matvec (docs/decode.md). The
    frozen graph holds those weights as constants, some of them transformed copies (the packed linears): do not
    change the model's weights after a frozen engine's first step (build a new engine). Every rank of a lane
    group builds the same engine and calls it with the same arguments. The engine takes ``model`` for decoding:
    a lane-sharded model's DTensor parameters become plain local ones (``local_parameters_``, same storage), so
    no compiled graph sees a DTensor; it cannot be trained afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch: int = 1,
        max_seq_len: int | None = None,
        dtype: str | torch.dtype | None = None,
        compile: bool = False,
        mode: str | None = None,
        compile_prefill: bool = True,
        freeze: bool | None = None,
    ):
        local_parameters_(model)
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            model.to(dtype)
        self.model = model.eval()
        self.batch = batch
        self.cache = model.setup_cache(batch, max_seq_len)
        self.max_seq_len = self.cache.max_seq_len
        self.device = model.tok_embeddings.weight.device
        self.compiled = compile
        self.group = _lane_group(model)
        # A vocabulary-parallel head: the steps return this rank's logit shard and ``pick`` gathers candidates.
        self.vocab_parallel = bool(getattr(model, "vocab_parallel", False))
        self._decode, self._prefill = self._decode_step, self._prefill_step
        self._dynamic_prefill = compile and compile_prefill
        self.frozen = compile and (self.device.type == "cpu" and mode is None if freeze is None else freeze)
        if self.frozen and mode is not None:
            raise ValueError(f"freeze=True compiles in inductor's default mode; drop mode={mode!r} or set freeze=False")
        if compile:
            if mode is None and self.device.type == "cuda":
                mode = "reduce-overhead"
            decode, prefill = (self._frozen_decode_step, self._frozen_prefill_step) if self.frozen else (
                self._decode_step, self._prefill_step)  # fmt: skip
            self._decode = _frozen(torch.compile(decode, fullgraph=True, mode=mode), self.frozen)
            if compile_prefill:
                self._prefill = _frozen(torch.compile(prefill, fullgraph=True, dynamic=True), self.frozen)

    # Two functions, not one: Dynamo caches compiled graphs per function, so the decode graph (s = 1) and the
    # dynamic-length prefill graph each have their own cache and neither counts as the other's recompile.
    # Every engine adds one entry to each (the guards are on this engine's model and cache): with more than
    # ``torch._dynamo.config.recompile_limit`` (8) engines in one process, raise it (benchmarks/decode.py does).
    def _decode_step(self, tokens_b1: torch.Tensor, input_pos_1: torch.Tensor) -> torch.Tensor:
        return self.model(tokens_b1, self.cache.at(input_pos_1), gather_logits=not self.vocab_parallel)[:, -1]

    def _prefill_step(self, tokens_bs: torch.Tensor, input_pos_s: torch.Tensor) -> torch.Tensor:
        return self.model(tokens_bs, self.cache.at(input_pos_s), gather_logits=not self.vocab_parallel)[:, -1]

    # The frozen steps have code objects of their own. Dynamo keeps its graphs per code object and its guards do
    # not tell two engines of one model apart, so without them a frozen graph (weights as constants) would serve an
    # unfrozen engine of the same model, or the reverse (seen: an unfrozen engine ran the packed MKL linears).
    def _frozen_decode_step(self, tokens_b1: torch.Tensor, input_pos_1: torch.Tensor) -> torch.Tensor:
        return self._decode_step(tokens_b1, input_pos_1)

    def _frozen_prefill_step(self, tokens_bs: torch.Tensor, input_pos_s: torch.Tensor) -> torch.Tensor:
        return self._prefill_step(tokens_bs, input_pos_s)

    # ------------------------------------------------------------------ the two steps
    @torch.no_grad()
    def prefill(self, tokens_bs: torch.Tensor) -> torch.Tensor:
        """Write the prompt (b, s) into the cache from position 0; last-position logits (b, v) (a vocab shard)."""
        s = tokens_bs.shape[1]
        input_pos = torch.arange(s, device=self.device)
        if self._dynamic_prefill and s > 1:
            torch._dynamo.mark_dynamic(tokens_bs, 1)  # one graph for every prompt length
            torch._dynamo.mark_dynamic(input_pos, 0)
        # A one-token prompt would specialise the dynamic graph to s=1: it is a decode step at position 0.
        step = self._prefill if s > 1 else self._decode
        return step(tokens_bs, input_pos)

    @torch.no_grad()
    def decode(self, tokens_b1: torch.Tensor, input_pos_1: torch.Tensor) -> torch.Tensor:
        """One token per sequence (b, 1) at position ``input_pos_1`` (1,); logits (b, v) (a vocab shard)."""
        return self._decode(tokens_b1, input_pos_1)

    def pick(self, logits_bv: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None):
        """Next tokens (b,) from what ``prefill`` / ``decode`` returned (``sample``, or its vocab-parallel form)."""
        if self.vocab_parallel:
            return vocab_parallel_sample(logits_bv, self.model.comm, temperature, top_k, generator)
        return sample(logits_bv, temperature, top_k, generator)

    # ------------------------------------------------------------------ the loop
    def _agree(self, tokens_b: torch.Tensor, temperature: float) -> torch.Tensor:
        """Rank 0's sampled tokens for the whole lane group (only when sampling could diverge)."""
        if self.group is None or temperature == 0.0:
            return tokens_b
        import torch.distributed as dist  # only reached when a process group exists

        dist.broadcast(tokens_b, src=dist.get_global_rank(self.group, 0), group=self.group)
        return tokens_b

    def check(self, prompt_bs: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
        """ValueError with a message a user can act on, for any argument the loop cannot honour."""
        vocab = self.model.cfg.vocab_size
        if prompt_bs.dim() != 2 or prompt_bs.shape[1] == 0:
            raise ValueError(f"prompt must be (batch, length >= 1) token ids, got shape {tuple(prompt_bs.shape)}")
        if prompt_bs.shape[0] != self.batch:
            raise ValueError(f"prompt batch {prompt_bs.shape[0]} != the engine's batch={self.batch}")
        bad = prompt_bs[(prompt_bs < 0) | (prompt_bs >= vocab)]
        if bad.numel():
            raise ValueError(f"prompt token ids {bad[:5].tolist()} are outside the vocabulary 0..{vocab - 1}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if prompt_bs.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({prompt_bs.shape[1]} tokens) + max_new_tokens={max_new_tokens} exceeds the cache's "
                f"max_seq_len={self.max_seq_len}; shorten the prompt or ask for fewer tokens"
            )
        if not temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if top_k is not None and not 1 <= top_k <= vocab:
            raise ValueError(f"top_k={top_k} must be in 1..vocab_size={vocab} (or None for no cut)")

    @torch.no_grad()
    def generate(
        self,
        prompt_bs: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        eos_id: int | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """New tokens (b, n <= max_new_tokens) after the same-length prompts ``prompt_bs`` (b, s).

        ``seed`` seeds the device-side sampler (same seed, same tokens). With ``eos_id`` a sequence that emitted
        it keeps emitting it, and the loop stops once every sequence has (one host sync per token, only then).
        ``on_token(tokens_b)`` sees each step's tokens as they come (streaming).
        """
        prompt_bs = prompt_bs.to(self.device)
        self.check(prompt_bs, max_new_tokens, temperature, top_k)
        if max_new_tokens == 0:
            return prompt_bs.new_empty(self.batch, 0)
        generator = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        logits_bv = self.prefill(prompt_bs)
        input_pos = torch.tensor([prompt_bs.shape[1]], device=self.device)
        done_b = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        out: list[torch.Tensor] = []
        while True:
            tokens_b = self._agree(self.pick(logits_bv, temperature, top_k, generator), temperature)
            if eos_id is not None:
                tokens_b = tokens_b.masked_fill(done_b, eos_id)
                done_b = done_b | (tokens_b == eos_id)
            out.append(tokens_b)
            if on_token is not None:
                on_token(tokens_b)
            if len(out) == max_new_tokens or (eos_id is not None and bool(done_b.all())):
                return torch.stack(out, dim=1)
            logits_bv = self.decode(tokens_b[:, None], input_pos)
            input_pos = input_pos + 1
