"""Typed, validated model configuration for every architecture of the zoo.

One frozen dataclass describes a Llama baseline (``arch="llama"``) and a Tensor Parallel Block model
(``arch="tp_blocks"``, recipe Sandwich or Burger, with delayed communication and block mixing). Every
constraint is checked in ``__post_init__`` and reported as a ``ValueError`` naming the field and the fix,
so a bad Hydra override fails at start-up instead of deep inside a matmul.

Vocabulary used throughout (report §4):
  hidden_size           model hidden size h: embeddings, classic decoder layers, final norm
  lane_count  (L)       parallel lanes of one TP block
  lane_depth            decoder layers per lane
  recipe                "sandwich": split -> lanes of hidden h/L -> concatenate
                        "burger":   copy  -> lanes of hidden h, FFN down-projection writes only the lane's
                                    h/L slice -> sample slice l of lane l + concatenate
                        "track":    copy  -> lanes of hidden h -> x + sum of the lanes' updates (Parallel Track:
                                    G tracks synchronised every lane_depth layers)
  arch                  "llama" (baseline), "tp_blocks" (the above), and the other schedules of
                        ``schedules.py``: "palm" (parallel attention+FFN), "ladder" (Ladder residual),
                        "kraken" (G lanes of n_layers, lane_count = G), and "dtp" (Delayed Tensor Parallelism,
                        Kog's Laneformer: ``dtp.py``)
  tp_block_repetition   number of (TP block + n_classic_layers classic layers) groups (block mixing, §4.3)
  comm_start/interleave/length   delayed communication (§4.2), see ``delayed_sends``
  broadcast_delay (δ)   arch="dtp": a layer from δ on receives the other lanes' partial outputs of layer i - δ
  sliding_window        any arch: windowed causal attention on the layers ``windowed_layers`` names
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from tpblocks.typed import check_fields
from tpblocks.typed import require as _require

Arch = Literal["llama", "tp_blocks", "palm", "ladder", "kraken", "dtp"]
Recipe = Literal["sandwich", "burger", "track"]
Reception = Literal["sum", "mean", "gated"]
LaneHead = Literal["replicate", "lane", "vocab_parallel"]
DTPRule = Literal["present", "past", "no_reduce"]

ARCHS = ("llama", "tp_blocks", "palm", "ladder", "kraken", "dtp")
LANE_HEADS = ("replicate", "lane", "vocab_parallel")
DENSE_ARCHS = ("llama", "palm", "ladder")  # stacks of n_layers full-width layers, Megatron-sharded
RECIPES = ("sandwich", "burger", "track")
RECEPTIONS = ("sum", "mean", "gated")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture hyper-parameters. Defaults describe a tiny Llama that runs anywhere."""

    arch: Arch = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    n_heads: int = 4  # attention heads of classic (dense) decoder layers
    n_kv_heads: int = 2  # KV heads of classic layers (GQA); must divide n_heads
    ffn_factor: float = 2.0  # classic-layer intermediate size = round(ffn_factor * hidden_size)
    ffn_hidden_size: int | None = None  # explicit classic intermediate size; overrides ffn_factor
    n_layers: int = 2  # llama / palm / ladder / kraken: number of decoder layers
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # report §5.3.1: tying halves the embedding share of the budget
    init_std: float = 0.02

    # --- Tensor Parallel Blocks (arch="tp_blocks") ---
    recipe: Recipe = "burger"
    lane_count: int = 1
    lane_depth: int = 1
    tp_block_repetition: int = 1
    n_classic_layers: int = 0  # classic layers after each TP block (block mixing)
    lane_n_heads: int | None = None  # defaults to n_heads
    lane_n_kv_heads: int | None = None  # defaults to n_kv_heads
    lane_ffn_factor: float = 2.0  # lane intermediate size = round(lane_ffn_factor * lane hidden size)
    lane_ffn_hidden_size: int | None = None  # explicit lane intermediate size; overrides lane_ffn_factor
    # Delayed communication (§4.2): lanes broadcast their hidden state after layer d and add the other lanes'
    # states after layer d + comm_length. Sends happen at d = comm_start, comm_start + (comm_interleave + 1), ...
    # comm_interleave is the number of layers skipped between two sends (0 = every layer, as in Kraken).
    delayed_comm: bool = False
    comm_start: int = 0
    comm_interleave: int = 0
    comm_length: int = 1
    # "sum" is the report's plain sum (it blew up in Fig. 22a); "mean" divides by L-1; "gated" (default) adds
    # g_l * RMSNorm(mean of the other lanes) with g zero-initialised, so training starts from the lane-isolated
    # model and learns how much to listen. See docs in tpblocks/models/delayed.py.
    comm_reception: Reception = "gated"

    # --- Delayed Tensor Parallelism (arch="dtp", Kog's Laneformer; dtp.py). lane_count lanes, each a full-width
    # residual stream holding 1/lane_count of the n_layers layers' heads and FFN (Megatron shards per lane).
    broadcast_delay: int = 2  # δ: layer i >= δ adds the other lanes' sub-layer outputs of layer i - δ ("past")
    use_comm: bool = True  # False: every layer "no_reduce" (own output x sqrt(L)): L independent lanes
    use_early_comm: bool = True  # layers below δ: "present" (all-reduce now) if True, else "no_reduce"
    # Whether a "present" layer's outputs are also received δ layers later (their cross-lane terms then arrive
    # twice). The sources do not settle it; the older Laneformer code does (default).
    early_comm_resend: bool = True
    lm_head_type: LaneHead = "replicate"  # replicate: norm per lane, mean, Linear(h, V); lane: Linear(L h, V);
    # vocab_parallel: lane l produces vocabulary slice l
    pre_norm_lane_agg: bool = False  # replicate head: sum the lanes, then the final norm
    replicated_rmsn_scale: bool = True  # one RMSNorm weight (h) for all lanes; False: one per lane (L, h)

    # --- any arch ---
    rope_interleaved: bool = False  # complex-pair RoPE (Meta / Laneformer) instead of rotate-half (Hugging Face)
    sliding_window: int | None = None  # keys a query sees (itself included) on windowed layers; None: no window
    sliding_window_n_layers: int | None = None  # n: the first n layers, -n: the last n, None: every layer

    extra: dict = field(default_factory=dict, compare=False)  # free-form tags (flavor name, budget, ...)

    def __post_init__(self) -> None:
        check_fields(self)  # types first: every comparison below may assume them
        _require(self.arch in ARCHS, f"arch={self.arch!r} is unknown; choose one of {ARCHS}")
        for name in ("vocab_size", "hidden_size", "n_heads", "n_kv_heads", "max_seq_len"):
            _require(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be a positive integer")
        # An explicit size of 0 would silently fall back to its default (``x or default``): refuse it instead.
        for name in ("ffn_hidden_size", "lane_n_heads", "lane_n_kv_heads", "lane_ffn_hidden_size"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name}={value} must be a positive integer or null (= derived)")
        _require(self.ffn_factor > 0, f"ffn_factor={self.ffn_factor} must be > 0")
        _require(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0")
        _require(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0 (RoPE base; 10000 is usual)")
        _require(self.init_std >= 0, f"init_std={self.init_std} must be >= 0")
        self._check_heads("classic layers", self.hidden_size, self.n_heads, self.n_kv_heads, "n_heads", "n_kv_heads")
        if self.arch != "tp_blocks":
            _require(self.n_layers > 0, f"n_layers={self.n_layers} must be >= 1 for arch={self.arch!r}")
        self._check_sliding_window()
        if self.arch == "tp_blocks":
            self._check_tp_blocks()
        elif self.arch == "dtp":
            self._check_dtp()
        elif self.arch == "kraken":
            _require(self.lane_count >= 1, f"lane_count={self.lane_count} (Kraken's degree G) must be >= 1")
            self._check_heads(
                "Kraken lane", self.hidden_size, self.lane_heads, self.lane_kv_heads, "lane_n_heads", "lane_n_kv_heads"
            )

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_heads(where: str, width: int, heads: int, kv: int, heads_name: str, kv_name: str) -> None:
        _require(
            width % heads == 0,
            f"{heads_name}={heads} does not divide the {where} hidden size {width}; pick a divisor of {width}",
        )
        _require(heads % kv == 0, f"{kv_name}={kv} must divide {heads_name}={heads} (grouped-query attention)")
        _require(
            (width // heads) % 2 == 0,
            f"head dim {width // heads} of {where} must be even for RoPE; change {heads_name} or the hidden size",
        )

    def _check_sliding_window(self) -> None:
        if self.sliding_window is None:
            _require(self.sliding_window_n_layers is None, "sliding_window_n_layers is set but sliding_window is not")
            return
        _require(self.sliding_window >= 1, f"sliding_window={self.sliding_window} must be >= 1 (keys per query)")
        n, depth = self.sliding_window_n_layers, self.n_decoder_layers
        _require(
            n is None or abs(n) <= depth,
            f"sliding_window_n_layers={n} names more layers than the model's {depth} (use -{depth}..{depth} or null)",
        )

    def _check_dtp(self) -> None:
        L = self.lane_count
        _require(L >= 1, f"lane_count={L} (Laneformer num_lanes) must be >= 1")
        for name, value in (("n_heads", self.n_heads), ("n_kv_heads", self.n_kv_heads), ("FFN size", self.ffn_hidden)):
            _require(value % L == 0, f"{name}={value} must be a multiple of lane_count={L}: lane l holds 1/L of them")
        _require(self.broadcast_delay >= 1, f"broadcast_delay={self.broadcast_delay} must be >= 1 layer")
        _require(self.lm_head_type in LANE_HEADS, f"lm_head_type={self.lm_head_type!r}; choose one of {LANE_HEADS}")
        _require(
            not (self.tie_embeddings and self.lm_head_type == "lane"),
            "lm_head_type='lane' is Linear(lane_count x hidden, vocab): it cannot be tied to the (vocab, hidden) "
            "embedding; set tie_embeddings=false",
        )
        _require(
            not (self.tie_embeddings and self.lm_head_type == "vocab_parallel"),
            "lm_head_type='vocab_parallel': lane l's vocabulary rows live on lane l's rank while the embedding is "
            "whole on every rank, so they cannot stay tied once sharded; set tie_embeddings=false",
        )
        _require(
            self.lm_head_type != "vocab_parallel" or self.vocab_size % L == 0,
            f"lm_head_type='vocab_parallel' needs vocab_size={self.vocab_size} to be a multiple of lane_count={L}",
        )
        _require(
            not self.pre_norm_lane_agg or (self.lm_head_type == "replicate" and self.replicated_rmsn_scale),
            "pre_norm_lane_agg sums the lanes before one final norm: it needs lm_head_type='replicate' and "
            "replicated_rmsn_scale=true",
        )

    def _check_tp_blocks(self) -> None:
        _require(self.recipe in RECIPES, f"recipe={self.recipe!r} is unknown; choose one of {RECIPES}")
        for name in ("lane_count", "lane_depth", "tp_block_repetition"):
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _require(self.n_classic_layers >= 0, f"n_classic_layers={self.n_classic_layers} must be >= 0")
        _require(self.lane_ffn_factor > 0, f"lane_ffn_factor={self.lane_ffn_factor} must be > 0")
        why = "Sandwich lanes get h/L features" if self.recipe == "sandwich" else "Burger lane l writes slice l of h/L"
        _require(
            self.recipe == "track" or self.hidden_size % self.lane_count == 0,
            f"lane_count={self.lane_count} must divide hidden_size={self.hidden_size} ({why}); "
            f"use a hidden_size that is a multiple of {self.lane_count}",
        )
        self._check_heads(
            "lane", self.lane_hidden_size, self.lane_heads, self.lane_kv_heads, "lane_n_heads", "lane_n_kv_heads"
        )
        if self.delayed_comm:
            _require(self.comm_reception in RECEPTIONS, f"comm_reception must be one of {RECEPTIONS}")
            _require(self.comm_start >= 0, f"comm_start={self.comm_start} must be >= 0")
            _require(self.comm_interleave >= 0, f"comm_interleave={self.comm_interleave} must be >= 0")
            _require(self.comm_length >= 1, f"comm_length={self.comm_length} must be >= 1")
            _require(self.lane_count >= 2, "delayed_comm needs lane_count >= 2 (there is no other lane to hear)")
            _require(
                len(self.delayed_sends) > 0,
                f"delayed_comm is on but no send fits in lane_depth={self.lane_depth}: the first send after layer "
                f"comm_start={self.comm_start} would be received after layer {self.comm_start + self.comm_length}; "
                f"lower comm_start/comm_length or deepen the lanes",
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_hidden_size or int(round(self.ffn_factor * self.hidden_size))

    @property
    def lane_hidden_size(self) -> int:
        """Width of the residual stream inside a lane (Table 3)."""
        if self.arch == "tp_blocks" and self.recipe == "sandwich":
            return self.hidden_size // self.lane_count
        return self.hidden_size

    @property
    def lane_slice(self) -> int:
        """Features each lane contributes to the merged hidden state: h / L for both recipes."""
        return self.hidden_size // self.lane_count

    @property
    def lane_heads(self) -> int:
        return self.lane_n_heads or self.n_heads

    @property
    def lane_kv_heads(self) -> int:
        return self.lane_n_kv_heads or self.n_kv_heads

    @property
    def lane_head_dim(self) -> int:
        return self.lane_hidden_size // self.lane_heads

    @property
    def lane_ffn_hidden(self) -> int:
        return self.lane_ffn_hidden_size or int(round(self.lane_ffn_factor * self.lane_hidden_size))

    @property
    def lane_out_size(self) -> int:
        """Output width of a lane FFN's down-projection: h/L for Burger (Table 3), the lane width for Sandwich."""
        burger = self.arch == "tp_blocks" and self.recipe == "burger"
        return self.lane_slice if burger else self.lane_hidden_size

    @property
    def delayed_sends(self) -> tuple[int, ...]:
        """Lane layer indices after which a lane broadcasts; each is received after layer d + comm_length.

        Sends whose reception would fall past the last lane layer are dropped (nothing could hear them).
        """
        if not self.delayed_comm:
            return ()
        period = self.comm_interleave + 1
        return tuple(
            d for d in range(self.comm_start, self.lane_depth, period) if d + self.comm_length <= self.lane_depth - 1
        )

    @property
    def dtp_rules(self) -> tuple[DTPRule, ...]:
        """arch="dtp": how each layer combines its lanes' sub-layer outputs (dtp.py)."""
        if not self.use_comm:
            return ("no_reduce",) * self.n_layers
        early = "present" if self.use_early_comm else "no_reduce"
        return tuple(early if i < self.broadcast_delay else "past" for i in range(self.n_layers))

    @property
    def dtp_sends(self) -> tuple[bool, ...]:
        """arch="dtp": whether layer i's lane outputs are received by layer i + δ (which exists and is "past")."""
        rules = self.dtp_rules
        return tuple(
            i + self.broadcast_delay < self.n_layers
            and rules[i + self.broadcast_delay] == "past"
            and (rules[i] != "present" or self.early_comm_resend)
            for i in range(self.n_layers)
        )

    @property
    def windowed_layers(self) -> tuple[int, ...]:
        """Sequential layer indices (0 .. n_decoder_layers - 1) whose attention is windowed."""
        if self.sliding_window is None:
            return ()
        depth, n = self.n_decoder_layers, self.sliding_window_n_layers
        if n is None:
            return tuple(range(depth))
        return tuple(range(n)) if n >= 0 else tuple(range(depth + n, depth))

    @property
    def n_decoder_layers(self) -> int:
        """Sequential depth of the model (a lane counts once)."""
        if self.arch != "tp_blocks":
            return self.n_layers
        return self.tp_block_repetition * (self.lane_depth + self.n_classic_layers)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
