"""Every communication schedule at matched parameters: one Llama shape, re-cut by each schedule.

A schedule family starts from a Llama config (width, depth, heads, FFN ratio, vocabulary) and builds each
schedule with the *same sequential depth*, then re-solves the hidden size so that every member has the Llama's
parameter count, embeddings included (report §6.1's rule, ``sizing.solve_hidden_size``):

  schedule  config                                                         syncs / token (G ranks)
  llama     arch="llama" (Llama-TP once sharded)                           2 L blocking
  palm      arch="palm": attention and FFN read one norm, one sum          L blocking
  ladder    arch="ladder": every sum awaited one sub-layer later           2 L overlapped
  kraken    arch="kraken", G lanes of L layers, n/G heads, FFN/G each      1 blocking + L-1 overlapped
  track     tp_blocks recipe "track": G tracks (n/G heads, FFN/G) of D     L / D blocking
            layers, L/D blocks
  burger    tp_blocks recipe "burger": one block of G lanes of depth L     1 blocking (the TP-block reference)
  dtp       arch="dtp" (Laneformer): G full-width lanes, each a Megatron    2 δ + 1 blocking, 2 (L - 2 δ)
            shard of every layer, delay δ = 2 (``dtp.py``)                 overlapped

Named flavors (registered in ``flavors.FLAVORS``): ``schedule_<name>_tiny`` (CPU smoke training and tests,
4 layers, G = 2) and ``schedule_<name>_150m`` (the §6 protocol: vocab 32,001 tied, 12 layers, 150M, G = 4).
"""

from __future__ import annotations

from collections.abc import Callable

from .config import ModelConfig
from .sizing import solve_hidden_size, total_parameters

SCHEDULE_NAMES = ("llama", "palm", "ladder", "kraken", "track", "burger", "dtp")
DTP_DELAY = 2  # Laneformer's broadcast_delay


def schedule_config(
    schedule: str,
    base: ModelConfig,
    *,
    degree: int = 2,
    track_depth: int | None = None,
    budget: int | None = None,
) -> ModelConfig:
    """``schedule`` built from the Llama ``base`` with the same depth and ``budget`` parameters (default: base's).

    ``degree`` is G: Kraken's lanes, Parallel Track's tracks, Burger's lanes (the lane group size they are made
    for). ``track_depth`` is D, the layers between two Track syncs (default: half the depth, 2 syncs per token).
    """
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"schedule={schedule!r} is unknown; choose one of {SCHEDULE_NAMES}")
    if base.arch != "llama":
        raise ValueError(f"base.arch={base.arch!r}: a schedule family starts from a Llama config (arch='llama')")
    if degree < 1 or base.n_heads % degree:
        raise ValueError(f"degree={degree} must be >= 1 and divide n_heads={base.n_heads} (each lane gets n/G heads)")
    depth = base.n_layers
    track_depth = track_depth or max(1, depth // 2)
    if depth % track_depth:
        raise ValueError(f"track_depth={track_depth} must divide n_layers={depth} (Track syncs every D layers)")
    budget = budget or total_parameters(base)
    narrow = dict(  # a lane with its share of heads and of the FFN (Kraken, Track)
        lane_count=degree,
        lane_n_heads=base.n_heads // degree,
        lane_n_kv_heads=max(1, base.n_kv_heads // degree),
        lane_ffn_factor=base.ffn_hidden / base.hidden_size / degree,
        ffn_hidden_size=None,
    )
    if schedule in ("llama", "palm", "ladder"):
        cfg = base.replace(arch=schedule)
    elif schedule == "kraken":
        cfg = base.replace(arch="kraken", **narrow)
    elif schedule == "track":
        cfg = base.replace(arch="tp_blocks", recipe="track", lane_depth=track_depth,
                           tp_block_repetition=depth // track_depth, n_classic_layers=0, **narrow)  # fmt: skip
    elif schedule == "dtp":  # the Llama's own layers cut into lanes: the same parameter count as the Llama
        if base.n_kv_heads % degree:
            raise ValueError(f"degree={degree} must divide n_kv_heads={base.n_kv_heads} (a DTP lane owns k/G KV heads)")
        cfg = base.replace(arch="dtp", lane_count=degree, broadcast_delay=DTP_DELAY)
    else:
        cfg = base.replace(arch="tp_blocks", recipe="burger", lane_count=degree, lane_depth=depth,
                           tp_block_repetition=1, n_classic_layers=0, lane_n_heads=base.n_heads,
                           lane_n_kv_heads=base.n_kv_heads,
                           lane_ffn_factor=base.ffn_hidden / base.hidden_size)  # fmt: skip
    solved = solve_hidden_size(cfg, budget)
    return solved.replace(extra={**solved.extra, "schedule": schedule, "budget": budget})


def tiny_base() -> ModelConfig:
    """The CPU-sized Llama of the tiny family (about 0.3M parameters at vocab 256)."""
    return ModelConfig(arch="llama", vocab_size=256, hidden_size=64, n_heads=4, n_kv_heads=2, n_layers=4,
                       ffn_factor=2.0, max_seq_len=256)  # fmt: skip


def protocol_base() -> ModelConfig:
    """§6 protocol shape: 12 layers, 12 heads / 4 KV heads, FFN 2 x hidden, vocab 32,001 tied, 150M budget."""
    return ModelConfig(arch="llama", vocab_size=32001, hidden_size=768, n_heads=12, n_kv_heads=4, n_layers=12,
                       ffn_factor=2.0, max_seq_len=2048)  # fmt: skip


def schedule_flavors() -> dict[str, Callable[[], ModelConfig]]:
    """``schedule_<name>_tiny`` and ``schedule_<name>_150m`` for every schedule, to merge into ``FLAVORS``."""
    out: dict[str, Callable[[], ModelConfig]] = {}
    for name in SCHEDULE_NAMES:
        out[f"schedule_{name}_tiny"] = lambda name=name: schedule_config(name, tiny_base(), degree=2)
        out[f"schedule_{name}_150m"] = lambda name=name: schedule_config(
            name, protocol_base(), degree=4, track_depth=4, budget=150_000_000
        )
    return out
