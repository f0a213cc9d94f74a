"""The language model: embedding -> stages -> final norm -> head (tied to the embedding by default).

Stages are the sequential units of the model:
  arch="llama"      n_layers classic DecoderLayers (the Llama-2/3 baseline)
  arch="tp_blocks"  tp_block_repetition x (TPBlock + n_classic_layers DecoderLayers)   (block mixing, §4.3)
  arch="palm"       n_layers ParallelLayers                                             (schedules.py)
  arch="ladder"     one LadderStack of n_layers DecoderLayers
  arch="kraken"     one KrakenBlock of lane_count lanes x n_layers
  arch="dtp"        one DTPStack of lane_count full-width lanes x n_layers (Delayed Tensor Parallelism, dtp.py);
                    the head aggregates its lanes (``lane_head_logits``)

The model is pure PyTorch. Its communication points are calls on ``self.comm`` (a ``Communicator``);
``tpblocks.parallel`` swaps in a distributed communicator and shards weights from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from .comm import Communicator, LocalComm, SyncPlan
from .config import ModelConfig
from .dtp import DTPStack, final_norm, lane_head_logits
from .kv_cache import KVCache, StaticKVCache
from .layers import DecoderLayer, Embedding, Linear, RotaryEmbedding, local, residual_std
from .schedules import KrakenBlock, LadderStack, ParallelLayer
from .sizing import head_in_width
from .tp_block import TPBlock


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: Communicator | None = None):
        super().__init__()
        self.cfg = cfg
        self.comm = comm if comm is not None else LocalComm()
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = self._rope(cfg.head_dim)
        self.stages = nn.ModuleList(self._build_stages(cfg))
        self.norm = final_norm(cfg)
        self.output = Linear(head_in_width(cfg), cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._assign_cache_slots()
        self.reset_parameters()

    def _rope(self, head_dim: int) -> RotaryEmbedding:
        return RotaryEmbedding(head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.cfg.rope_interleaved)

    def _classic_layer(self, cfg: ModelConfig) -> DecoderLayer:
        return DecoderLayer(cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, cfg.norm_eps, self.rope)

    def _build_stages(self, cfg: ModelConfig) -> list[nn.Module]:
        if cfg.arch == "llama":
            return [self._classic_layer(cfg) for _ in range(cfg.n_layers)]
        if cfg.arch == "palm":
            return [ParallelLayer(cfg, self.rope) for _ in range(cfg.n_layers)]
        if cfg.arch == "ladder":
            return [LadderStack([self._classic_layer(cfg) for _ in range(cfg.n_layers)])]
        if cfg.arch == "dtp":
            return [DTPStack(cfg, self.rope)]
        lane_rope = self.rope
        if cfg.lane_head_dim != cfg.head_dim:
            lane_rope = self._rope(cfg.lane_head_dim)
        if cfg.arch == "kraken":
            return [KrakenBlock(cfg, lane_rope)]
        stages: list[nn.Module] = []
        for _ in range(cfg.tp_block_repetition):
            stages.append(TPBlock(cfg, lane_rope))
            stages.extend(self._classic_layer(cfg) for _ in range(cfg.n_classic_layers))
        return stages

    def _assign_cache_slots(self) -> None:
        """Number the attention modules in depth order (their KV-cache slots) and window the configured ones."""
        slot = 0
        windowed = self.cfg.windowed_layers
        for module in self.modules():
            if hasattr(module, "cache_slot"):
                module.cache_slot = slot
                module.window = self.cfg.sliding_window if slot in windowed else None
                slot += 1
        self.n_cache_slots = slot

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = residual_std(std, 2 * self.cfg.n_decoder_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 1 or leaf in ("attn_norm", "ffn_norm") or name == "norm.weight":
                nn.init.ones_(p)
            elif leaf == "gate":
                nn.init.zeros_(p)  # delayed-comm reception gates start closed (delayed.py)
            elif leaf in ("wo", "w_down") or name.endswith(("wo.weight", "w_down.weight", "proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ forward
    @property
    def vocab_parallel(self) -> bool:
        """True when the head yields vocabulary shards: ``shard_model(..., vocab_parallel_head=True)``, or a DTP
        model with ``lm_head_type="vocab_parallel"`` (in one process its one shard is the whole vocabulary)."""
        lane_vocab = self.cfg.arch == "dtp" and self.cfg.lm_head_type == "vocab_parallel"
        return lane_vocab or self.output.out_features != self.cfg.vocab_size  # placement sets out_features

    def forward(
        self, tokens_bs: torch.Tensor, cache: KVCache | None = None, gather_logits: bool = True
    ) -> torch.Tensor:
        """Logits (b, s, vocab). With a cache, ``tokens_bs`` are the next s tokens after ``cache.pos``.

        A vocabulary-parallel head's logits are gathered over the lane group (one blocking sync) unless
        ``gather_logits=False``: then this rank's shard (b, s, vocab / G) is returned.
        """
        x_bsh = self.tok_embeddings(tokens_bs)
        for stage in self.stages:
            x_bsh = stage(x_bsh, self.comm, cache)
        if x_bsh.dim() == 4:  # DTP: the lanes' streams (l, b, s, h) are still apart
            logits = lane_head_logits(x_bsh, self.norm, self.output, self.comm, self.cfg)
        else:
            logits = self.output(self.norm(x_bsh))
        if gather_logits and self.vocab_parallel:
            logits = self.comm.vocab_gather(logits)
        if cache is not None:
            cache.advance(tokens_bs.shape[1])
        return logits

    def new_cache(self, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.n_cache_slots, max_seq_len or self.cfg.max_seq_len)

    def setup_cache(
        self, batch: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None, device=None
    ) -> StaticKVCache:
        """Preallocated cache for ``batch`` sequences of up to ``max_seq_len`` positions (the decode engine's).

        Sized from the layers as they are now, so call it after ``shard_model`` / ``.to(dtype)``: each rank's
        buffers hold its own lanes / KV heads. Defaults: the model's ``max_seq_len``, dtype and device.
        """
        max_seq_len = max_seq_len or self.cfg.max_seq_len
        if not 0 < max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_seq_len={max_seq_len} must be in 1..model max_seq_len={self.cfg.max_seq_len}")
        if batch <= 0:
            raise ValueError(f"batch={batch} must be positive")
        weight = self.tok_embeddings.weight
        owners = {m.cache_slot: m for m in self.modules() if getattr(m, "cache_slot", -1) >= 0}
        if sorted(owners) != list(range(self.n_cache_slots)):  # post-hoc groups add slots no layer owns
            raise ValueError("this model has KV-cache slots that no attention layer owns; use new_cache() (eager)")
        shapes = [owners[slot].kv_cache_shape(batch) for slot in range(self.n_cache_slots)]
        return StaticKVCache(shapes, max_seq_len, dtype or weight.dtype, device or weight.device)

    def num_parameters(self) -> int:
        """Parameters held by this process, embeddings included, tied weights counted once."""
        return sum(local(p).numel() for p in self.parameters())


def sync_plan(cfg: ModelConfig, vocab_parallel_head: bool = False) -> SyncPlan:
    """Communication points of one forward of ``cfg``: its stages' own declarations summed (what
    ``comm.counter`` counts), without building it. The stages are ``TransformerLM._build_stages``'s.

    The head adds one: DTP's lane aggregation, and the logit gather of a vocabulary-parallel head.
    """
    if cfg.arch == "llama":
        plan = DecoderLayer.sync_plan() * cfg.n_layers
    elif cfg.arch == "palm":
        plan = ParallelLayer.sync_plan(cfg) * cfg.n_layers
    elif cfg.arch == "ladder":
        plan = LadderStack.sync_plan(cfg)
    elif cfg.arch == "kraken":
        plan = KrakenBlock.sync_plan(cfg)
    elif cfg.arch == "dtp":
        plan = DTPStack.sync_plan(cfg) + SyncPlan(blocking=1)
    else:
        plan = (TPBlock.sync_plan(cfg) + DecoderLayer.sync_plan() * cfg.n_classic_layers) * cfg.tp_block_repetition
    return plan + SyncPlan(blocking=int(vocab_parallel_head))


def build_model(cfg: ModelConfig, comm: Communicator | None = None) -> TransformerLM:
    return TransformerLM(cfg, comm)
