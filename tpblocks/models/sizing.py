"""Parameter counting and budget matching (report §6.1: "adapt the hidden size to achieve a similar total
number of parameters, embedding included").

``count_parameters`` is analytic (no weights allocated, so a 1.5B config costs nothing) and is tested to
equal ``sum(p.numel())`` of the built model. ``solve_hidden_size`` picks the valid hidden size whose count
is closest to a budget and fails loudly when none lands within the tolerance.
"""

from __future__ import annotations

import math

from .config import ModelConfig


def _attention_params(width: int, n_heads: int, n_kv_heads: int) -> int:
    e = width // n_heads
    return 2 * width * n_heads * e + 2 * width * n_kv_heads * e


def classic_layer_params(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    return _attention_params(h, cfg.n_heads, cfg.n_kv_heads) + 3 * h * cfg.ffn_hidden + 2 * h


def lane_layer_params(cfg: ModelConfig) -> int:
    """One lane's layer: SwiGLU with the down-projection truncated to h/L for Burger (Table 3)."""
    d, f = cfg.lane_hidden_size, cfg.lane_ffn_hidden
    return _attention_params(d, cfg.lane_heads, cfg.lane_kv_heads) + 2 * d * f + f * cfg.lane_out_size + 2 * d


def _dtp_norm_params(cfg: ModelConfig) -> int:
    """One RMSNorm of a DTP model: shared by the lanes (h) or one per lane (L h)."""
    return cfg.hidden_size * (1 if cfg.replicated_rmsn_scale else cfg.lane_count)


def dtp_layer_params(cfg: ModelConfig) -> int:
    """All lanes of one DTP layer: the dense layer's matrices (cut into lane shards), plus its two norms."""
    return classic_layer_params(cfg) - 2 * cfg.hidden_size + 2 * _dtp_norm_params(cfg)


def head_in_width(cfg: ModelConfig) -> int:
    """Input width of the output projection: L x h for DTP's ``lane`` head, h otherwise."""
    return cfg.lane_count * cfg.hidden_size if cfg.arch == "dtp" and cfg.lm_head_type == "lane" else cfg.hidden_size


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count by part; ``total`` includes embeddings (and the head when untied)."""
    h = cfg.hidden_size
    head = cfg.vocab_size * head_in_width(cfg)
    parts = {"embedding": cfg.vocab_size * h, "head": 0 if cfg.tie_embeddings else head, "norm": h}
    if cfg.arch == "dtp":
        parts["norm"] = _dtp_norm_params(cfg)
        parts["lane_layers"] = cfg.n_layers * dtp_layer_params(cfg)
    elif cfg.arch in ("llama", "ladder"):
        parts["classic_layers"] = cfg.n_layers * classic_layer_params(cfg)
    elif cfg.arch == "palm":  # one shared norm per layer
        parts["classic_layers"] = cfg.n_layers * (classic_layer_params(cfg) - h)
    elif cfg.arch == "kraken":
        parts["lane_layers"] = cfg.n_layers * cfg.lane_count * lane_layer_params(cfg)
        parts["lane_projection"] = cfg.lane_count * h * h
    else:
        reps = cfg.tp_block_repetition
        parts["lane_layers"] = reps * cfg.lane_count * cfg.lane_depth * lane_layer_params(cfg)
        parts["classic_layers"] = reps * cfg.n_classic_layers * classic_layer_params(cfg)
        gated = cfg.comm_reception == "gated"
        parts["reception"] = reps * len(cfg.delayed_sends) * cfg.lane_count * cfg.lane_hidden_size if gated else 0
    parts["total"] = sum(parts.values())
    return parts


def total_parameters(cfg: ModelConfig) -> int:
    return count_parameters(cfg)["total"]


def _norm_and_gate_parameters(cfg: ModelConfig) -> int:
    """Element-wise weights (RMSNorm gains, reception gates): parameters that cost no matmul FLOPs."""
    h = cfg.hidden_size
    if cfg.arch in ("llama", "ladder", "palm"):
        per_layer = h if cfg.arch == "palm" else 2 * h  # PaLM layers share one norm
        return h + cfg.n_layers * per_layer
    if cfg.arch == "dtp":
        return (1 + 2 * cfg.n_layers) * _dtp_norm_params(cfg)
    if cfg.arch == "kraken":
        return h + cfg.n_layers * cfg.lane_count * 2 * h
    reps = cfg.tp_block_repetition
    lane_norms = reps * cfg.lane_count * cfg.lane_depth * 2 * cfg.lane_hidden_size
    return h + lane_norms + reps * cfg.n_classic_layers * 2 * h + count_parameters(cfg)["reception"]


def attention_width_sum(cfg: ModelConfig) -> int:
    """Sum over every attention of (query heads x head dim): what the score and value matmuls scale with."""
    classic = cfg.n_heads * cfg.head_dim
    lane = cfg.lane_heads * cfg.lane_head_dim
    if cfg.arch in ("llama", "ladder", "palm", "dtp"):
        return cfg.n_layers * classic
    if cfg.arch == "kraken":
        return cfg.n_layers * cfg.lane_count * lane
    per_block = cfg.lane_count * cfg.lane_depth * lane + cfg.n_classic_layers * classic
    return cfg.tp_block_repetition * per_block


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward+backward FLOPs per token (PaLM appendix B convention: 6 x matmul parameters, with the output
    head counted even when tied, plus 12 x seq_len x attention width for QK^T and PV, causal mask not halved).

    Parameter-matched models can differ a lot here: a Burger lane is as wide as the model, so at equal
    parameters it runs more attention (and element-wise work) than the Llama it is matched to.
    """
    parts = count_parameters(cfg)
    head = cfg.vocab_size * head_in_width(cfg)
    matmul_params = parts["total"] - parts["embedding"] - parts["head"] + head - _norm_and_gate_parameters(cfg)
    flops = {"matmul": 6 * matmul_params, "attention": 12 * seq_len * attention_width_sum(cfg)}
    flops["total"] = flops["matmul"] + flops["attention"]
    return flops


def hidden_size_step(cfg: ModelConfig) -> int:
    """Smallest granularity of hidden sizes that keeps every head dim even and every split exact."""
    step = 2 * cfg.n_heads
    if cfg.arch == "dtp":  # FFN (ffn_factor x h) split over the lanes: keep h a multiple of L as well
        step = math.lcm(step, cfg.lane_count)
    if cfg.arch == "kraken":
        step = math.lcm(step, 2 * cfg.lane_heads)
    if cfg.arch == "tp_blocks":
        lane_unit = 2 * cfg.lane_heads * (cfg.lane_count if cfg.recipe == "sandwich" else 1)
        step = math.lcm(step, lane_unit, cfg.lane_count)
    return step


def _ffn_unit_params(cfg: ModelConfig) -> int:
    """Parameters added by one more unit of intermediate size (lane FFNs for TP blocks, classic for Llama)."""
    if cfg.arch in ("llama", "palm", "ladder", "dtp"):
        return cfg.n_layers * 3 * cfg.hidden_size
    per_lane = 2 * cfg.lane_hidden_size + cfg.lane_out_size
    if cfg.arch == "kraken":
        return cfg.n_layers * cfg.lane_count * per_lane
    return cfg.tp_block_repetition * cfg.lane_count * cfg.lane_depth * per_lane


def _close_gap_with_ffn(cfg: ModelConfig, budget: int) -> ModelConfig:
    """Grow the intermediate size of ``cfg`` (which is under budget) until the count is nearest ``budget``."""
    extra = round((budget - total_parameters(cfg)) / _ffn_unit_params(cfg))
    if cfg.arch == "dtp":  # the FFN stays a multiple of the lane count (each lane holds F/L columns)
        extra -= extra % cfg.lane_count
    if cfg.arch in ("llama", "palm", "ladder", "dtp"):
        return cfg.replace(ffn_hidden_size=cfg.ffn_hidden + extra)
    return cfg.replace(lane_ffn_hidden_size=cfg.lane_ffn_hidden + extra)


def solve_hidden_size(cfg: ModelConfig, budget: int, tolerance: float = 0.01, adjust_ffn: bool = True) -> ModelConfig:
    """Return ``cfg`` with the hidden size whose total parameter count is nearest ``budget``.

    Counts grow monotonically with the hidden size, so a bisection over multiples of ``hidden_size_step``
    finds the bracket; the nearer side wins. Wide lanes (e.g. 16 Burger lanes) make that grid coarse: when
    the nearest hidden size misses ``tolerance`` and ``adjust_ffn`` is set, the smaller hidden size is kept and
    the intermediate size (lane FFNs, or the classic FFN for Llama) grows to close the gap, which changes the
    FFN ratio by a few percent at most. Raises ``ValueError`` when nothing lands within tolerance (e.g. a
    budget smaller than the embeddings alone).
    """
    if budget <= 0:
        raise ValueError(f"budget={budget} must be positive")
    step = hidden_size_step(cfg)
    reset = dict(ffn_hidden_size=None, lane_ffn_hidden_size=None)

    def at(k: int) -> ModelConfig:
        return cfg.replace(hidden_size=k * step, **reset)

    def count(k: int) -> int:
        return total_parameters(at(k))

    lo, hi = 1, 2
    while count(hi) < budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            raise ValueError(f"budget={budget:,} is beyond any hidden size this config can reach")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < budget else (lo, mid)
    best = at(min((lo, hi), key=lambda k: abs(count(k) - budget)))
    if abs(total_parameters(best) - budget) > tolerance * budget and adjust_ffn and count(lo) < budget:
        best = _close_gap_with_ffn(at(lo), budget)
    found = total_parameters(best)
    if abs(found - budget) > tolerance * budget:
        raise ValueError(
            f"no hidden size brings this config within {tolerance:.1%} of {budget:,} parameters "
            f"(nearest: hidden_size={best.hidden_size} with {found:,}); change depth, lane count or vocabulary"
        )
    return best
