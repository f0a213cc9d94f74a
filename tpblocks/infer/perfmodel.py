"""Decode-time model of the report (§3 Eq. 1-9, §4.2, §4.5 Eq. 10-11), with hardware presets.

At batch 1 a decode step is memory bound: every weight (and the KV cache) is read once, and under tensor
parallelism every blocking communication point costs a fixed synchronisation latency t_sync. So

    t_decode = syncs_per_token x t_sync + M / (beta x G)             (Eq. 9-11 in one line)

with M the bytes read per step (parameters x precision + KV cache), beta the device memory bandwidth and
G the number of devices. Llama under Megatron tensor parallelism has 2 syncs per layer (Eq. 9); a model of
Tensor Parallel Blocks has one per block plus 2 per classic layer (Eq. 10); one block alone has 1 (Eq. 11).

Functions here are plain floats in SI units (bytes, seconds, bytes/s, FLOP/s). ``predict`` applies the
model to a ``ModelConfig``, counting what each device really reads (Table 2, KV-head ceiling per device).
A new communication schedule is a stage of the model family that declares its sync plan
(``tpblocks.models.model.sync_plan``); everything here then applies to it.

Where the report's printed figures and its own formulas disagree, the formula wins (docs/perfmodel.md,
reproduced by tests/test_perfmodel.py and ``python -m tpblocks.infer.perfmodel``):

* §6.7: TinyLlama (22 layers, 44 syncs, 2.2 GB, 8xH100, beta 3.9 TB/s, t_sync 5 us) -> 290.5 us / 3442 tok/s:
  matches. The TP-block model's printed 70 us / 14181 tok/s is M/(beta G) with *no* sync; with the 3 syncs
  the text names (1 block + 1 final classic layer, Eq. 10) it is 85.5 us / 11.7k tok/s. The honest speedup
  is 3.40x, not 4.2x; even with zero syncs it is 4.12x (14181 / 3442), never 4.2x.
* §3.4 Llama2-70B: 71.34 GB / 8 / 2 TB/s = 4.46 ms, not the printed 4.95 ms. Sync share of the step is
  8.2 % (4xA100) and 15.2 % (8xA100); the printed 9 % and 16 % are sync/memory ratios (9.0 %, 17.9 %)
  or use the wrong 4.95 ms. The printed 1.34 GB KV cache is 2 x 80 layers x 512 tokens x 8192 x 2 bytes:
  full-width MHA at the final context, not the stated 8 KV heads at the average context (84 MB in bf16).
* §4.2: 12.5 MB per lane layer needs 2.2 GB (2 GB gives 11.4 MB and length >= 1.72); the 1.56 follows.
  A delay is an integer number of layers, so "free" needs communication_length >= 2 in both cases.
* The H100 bandwidth 3.9 TB/s is the H100 NVL figure; an H100 SXM (DGX-H100, the report's Fig. 4) has 3.35 TB/s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from tpblocks.models.config import ModelConfig
from tpblocks.models.model import sync_plan
from tpblocks.models.sizing import classic_layer_params, lane_layer_params

US = 1e-6
GB = 1e9
TB = 1e12


# ====================================================================== hardware
@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One device of a multi-device node, as the report models it (§3.1)."""

    name: str
    beta: float  # device memory bandwidth, bytes/s (Eq. 1)
    t_sync: float  # latency of one blocking device-to-device synchronisation, s (Eq. 5, 7)
    alpha: float | None = None  # dense compute, FLOP/s (Eq. 2); None when only the memory-bound model is used
    beta_inter: float | None = None  # device-to-device link bandwidth, bytes/s (Eq. 5); None = ignore transfers
    source: str = ""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"Hardware {self.name!r}: beta={self.beta} must be a positive bandwidth in bytes/s")
        if self.t_sync < 0:
            raise ValueError(f"Hardware {self.name!r}: t_sync={self.t_sync} must be >= 0 seconds")
        for field_name in ("alpha", "beta_inter"):
            value = getattr(self, field_name)
            if value is not None and value <= 0:
                raise ValueError(f"Hardware {self.name!r}: {field_name}={value} must be positive or None")

    def replace(self, **changes) -> Hardware:
        return Hardware(**{**self.__dict__, **changes})


# t_sync: vendors do not publish it (§3.1.2). The report assumes 5 us for A100/H100 (§3.4, §4.2, §6.7) and cites
# 7-10 us measured on V100/P100 [63]; we keep 5 us for every NVLink preset and 7 us for the V100.
# beta_inter: NVLink bandwidth per direction (V100 NVLink2 150 GB/s, A100 NVLink3 300 GB/s, H100/H200 NVLink4 450 GB/s).
PRESETS: dict[str, Hardware] = {
    "v100": Hardware(
        name="v100", beta=0.9 * TB, t_sync=7e-6, alpha=125e12, beta_inter=150e9,
        source="NVIDIA V100 SXM2 datasheet: 900 GB/s HBM2, 125 TFLOPS fp16; t_sync: report §3.1.2 ([63]: 7-10 us)",
    ),
    "a100": Hardware(
        name="a100", beta=2.0 * TB, t_sync=5e-6, alpha=312e12, beta_inter=300e9,
        source="report §3.4 (beta 2 TB/s, t_sync 5 us); datasheet A100 80GB SXM: 2.039 TB/s, 312 TFLOPS bf16",
    ),
    "h100": Hardware(
        name="h100", beta=3.9 * TB, t_sync=5e-6, alpha=989e12, beta_inter=450e9,
        source="report §3.4/§6.7 (beta 3.9 TB/s = H100 NVL datasheet; t_sync 5 us); an H100 SXM has 3.35 TB/s",
    ),
    "h100_sxm": Hardware(
        name="h100_sxm", beta=3.35 * TB, t_sync=5e-6, alpha=989e12, beta_inter=450e9,
        source="NVIDIA H100 SXM5 80GB datasheet: 3.35 TB/s HBM3, 989 TFLOPS bf16 dense (DGX-H100 GPU)",
    ),
    "h200": Hardware(
        name="h200", beta=4.8 * TB, t_sync=5e-6, alpha=989e12, beta_inter=450e9,
        source="NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOPS bf16 dense, NVLink4 450 GB/s per direction; "
        "t_sync 5 us: an assumption (the report's NVLink figure, §3.1.2), not measured on H200 NVLink",
    ),
}  # fmt: skip


def get_hardware(name: str) -> Hardware:
    """A preset by name (``v100``, ``a100``, ``h100``, ``h100_sxm``, ``h200``)."""
    key = name.lower().replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


# ====================================================================== Eq. 1-8: device and communication
def t_move(m_bytes: float, beta: float) -> float:
    """Eq. 1: time to move ``m_bytes`` from memory to the compute units."""
    return m_bytes / beta


def t_compute(c_ops: float, alpha: float) -> float:
    """Eq. 2: time to perform ``c_ops`` operations."""
    return c_ops / alpha


def t_device(m_bytes: float, c_ops: float, hw: Hardware, overlap: bool = True) -> float:
    """Eq. 4 (``overlap``: moves and compute run concurrently, the slower wins) or Eq. 3 (they add up)."""
    move = t_move(m_bytes, hw.beta)
    if c_ops == 0:
        return move
    if hw.alpha is None:
        raise ValueError(f"hardware {hw.name!r} has no alpha (FLOP/s); pass c_ops=0 or set alpha")
    comp = t_compute(c_ops, hw.alpha)
    return max(move, comp) if overlap else move + comp


def t_communication(m_share: float, hw: Hardware, include_transfer: bool = False) -> float:
    """Eq. 5 (``include_transfer``: t_sync + M_share / beta_inter) or Eq. 7 (t_sync alone, the report's choice:
    at batch 1 a hidden state is a few KB and its transfer is ~100x shorter than t_sync)."""
    if not include_transfer:
        return hw.t_sync
    if hw.beta_inter is None:
        raise ValueError(f"hardware {hw.name!r} has no beta_inter; set it or use include_transfer=False")
    return hw.t_sync + m_share / hw.beta_inter


def t_distributed(m_distributed: float, c_distributed: float, m_share: float, hw: Hardware) -> float:
    """Eq. 6: a distributed operation whose result is needed at once = communication + local device time."""
    return t_communication(m_share, hw, include_transfer=hw.beta_inter is not None) + t_device(
        m_distributed, c_distributed, hw
    )


def break_even_bytes(hw: Hardware, devices: int) -> float:
    """Eq. 8: splitting an operation over G devices (one sync) pays off only above this many bytes."""
    _check_devices(devices)
    if devices == 1:
        return math.inf
    return hw.beta * hw.t_sync * devices / (devices - 1)


def parallel_pays_off(m_bytes: float, hw: Hardware, devices: int) -> bool:
    """Eq. 8: M/(G beta) + t_sync < M/beta."""
    return m_bytes > break_even_bytes(hw, devices)


# ====================================================================== Eq. 9-11: decode time
def t_decode(m_bytes: float, syncs: int, hw: Hardware, devices: int) -> float:
    """General decode step: ``syncs`` blocking syncs plus the bytes split over G devices (Eq. 9-11's shape).

    With one device nothing is communicated, whatever ``syncs`` says.
    """
    _check_devices(devices)
    if syncs < 0:
        raise ValueError(f"syncs={syncs} must be >= 0")
    sync_time = syncs * hw.t_sync if devices > 1 else 0.0
    return sync_time + t_move(m_bytes, hw.beta) / devices


def t_decode_llama_tp(m_bytes: float, n_layers: int, hw: Hardware, devices: int) -> float:
    """Eq. 9: dense Llama under Megatron tensor parallelism, 2 syncs per layer."""
    return t_decode(m_bytes, syncs_per_token("llama_tp", n_layers=n_layers), hw, devices)


def t_decode_tp_blocks(
    m_bytes: float, tp_block_repetition: int, n_classic_layers: int, hw: Hardware, devices: int
) -> float:
    """Eq. 10 (Eq. 11 when ``tp_block_repetition=1, n_classic_layers=0``): one sync per TP block, two per
    classic layer; delayed communication assumed long enough to hide (see ``min_comm_length``)."""
    syncs = syncs_per_token("tp_blocks", tp_block_repetition=tp_block_repetition, n_classic_layers=n_classic_layers)
    return t_decode(m_bytes, syncs, hw, devices)


def tokens_per_second(t_step: float, batch: int = 1) -> float:
    return batch / t_step


# ====================================================================== §4.2: delayed communication
def min_comm_length(layer_bytes: float, hw: Hardware) -> float:
    """§4.2: layers of work needed to hide one delayed sync, t_sync / (bytes of one lane layer / beta).

    A delay is a whole number of layers, so the usable setting is ``math.ceil`` of this."""
    return hw.t_sync / t_move(layer_bytes, hw.beta)


def exposed_delayed_wait(layer_bytes: float, comm_length: int, hw: Hardware) -> float:
    """Time a delayed sync still stalls the lane when ``comm_length`` layers are too few to hide it."""
    return max(0.0, hw.t_sync - comm_length * t_move(layer_bytes, hw.beta))


# ====================================================================== schedules: syncs per token
SyncRule = Callable[..., int]

SCHEDULES: dict[str, SyncRule] = {
    # Eq. 9: attention output and FFN output are each all-reduced (Megatron row-parallel).
    "llama_tp": lambda *, n_layers, **_: 2 * n_layers,
    # Eq. 10: the merge of each block, plus the two syncs of every classic (dense) layer after it.
    "tp_blocks": lambda *, tp_block_repetition, n_classic_layers=0, **_: (
        tp_block_repetition * (2 * n_classic_layers + 1)
    ),
    # The ceiling: every lane runs alone (no collective at all).
    "no_comm": lambda **_: 0,
    # Other schedules of the same model family (tpblocks/models/schedules.py); blocking syncs only. These named
    # rules take shapes (the report's printed examples); a config's count is its model's sync plan
    # (``syncs_for_config``), and tests/test_perfmodel_schedules.py checks the two agree.
    "palm": lambda *, n_layers, **_: n_layers,  # attention + FFN outputs reduced together
    "ladder": lambda **_: 0,  # every sum is asynchronous (awaited one sub-layer later)
    "kraken": lambda **_: 1,  # the final gather of the lanes
    "track": lambda *, tp_block_repetition, n_classic_layers=0, **_: tp_block_repetition * (2 * n_classic_layers + 1),
}


def syncs_per_token(schedule: str, *, vocab_parallel_head: bool = False, **shape: int) -> int:
    """Blocking syncs of one decode step for a named schedule (+1 when the LM head is vocab-parallel)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(sorted(SCHEDULES))}")
    try:
        syncs = SCHEDULES[schedule](**shape)
    except TypeError as e:
        raise ValueError(f"schedule {schedule!r} needs other shape arguments than {sorted(shape)}: {e}") from None
    if syncs < 0:
        raise ValueError(f"schedule {schedule!r} returned {syncs} syncs for {shape}")
    return syncs + (1 if vocab_parallel_head and schedule != "no_comm" else 0)


def syncs_for_config(cfg: ModelConfig, vocab_parallel_head: bool = False) -> int:
    """Blocking communication points of one forward step of ``cfg`` (what ``comm.counter.blocking`` counts): the
    model's own sync plan (``tpblocks.models.model.sync_plan``, declared by each stage)."""
    return sync_plan(cfg, vocab_parallel_head).blocking


def overlapped_syncs_for_config(cfg: ModelConfig) -> int:
    """Started-then-awaited communication points of one forward step: delayed lane sums, Ladder's, Kraken's and
    DTP's asynchronous sums (``sync_plan(cfg).overlapped``)."""
    return sync_plan(cfg).overlapped


# ====================================================================== bytes read per decode step (Tables 1-2)
def kv_cache_bytes(
    *, n_layers: int, n_kv_heads: int, head_dim: int, context: int, batch: int = 1, precision: float = 2,
    devices: int = 1,
) -> float:  # fmt: skip
    """Table 1/2: keys and values, 2 x b x ceil(n_kv / G) x s x d per layer, per device.

    The ceiling is the report's point on GQA: a device holding a query head needs a whole KV head, so KV heads
    are duplicated when ``n_kv_heads`` is not a multiple of G."""
    _check_devices(devices)
    return 2 * batch * math.ceil(n_kv_heads / devices) * context * head_dim * n_layers * precision


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one device reads in one decode step, by part."""

    layer_weights: float
    kv_cache: float
    head: float
    embedding: float  # the rows looked up (b x h), not the whole table

    @property
    def total(self) -> float:
        return self.layer_weights + self.kv_cache + self.head + self.embedding


def classic_layer_params_per_device(cfg: ModelConfig, devices: int) -> float:
    """Table 2: a classic layer's parameters on one of G Megatron shards (heads and KV heads rounded up)."""
    h, e = cfg.hidden_size, cfg.head_dim
    if devices == 1:
        return classic_layer_params(cfg)
    q_heads, kv_heads = math.ceil(cfg.n_heads / devices), math.ceil(cfg.n_kv_heads / devices)
    attn = h * q_heads * e * 2 + 2 * h * kv_heads * e  # W_q, W_o (h, h~ = ceil(n/G) d), W_k, W_v
    ffn = 3 * h * math.ceil(cfg.ffn_hidden / devices)
    return attn + ffn + 2 * h  # the two norms are replicated


def decode_bytes(
    cfg: ModelConfig,
    *,
    devices: int = 1,
    context: int = 0,
    batch: int = 1,
    precision: float = 2,
    vocab_parallel_head: bool = False,
) -> DecodeBytes:
    """What one of ``devices`` reads to decode one token at KV-cache length ``context``.

    Lanes of every TP block are spread evenly (lane_count must be a multiple of G, §4.1); classic layers are
    Megatron shards (Table 2); the head is replicated unless ``vocab_parallel_head``; the embedding lookup reads
    only ``batch`` rows.
    """
    _check_devices(devices)
    if context < 0 or batch < 1:
        raise ValueError(f"context={context} must be >= 0 and batch={batch} >= 1")
    h = cfg.hidden_size
    if cfg.arch in ("llama", "palm", "ladder"):
        n_classic, lane_weights, lane_kv = cfg.n_layers, 0.0, 0.0
        if cfg.arch == "palm":
            lane_weights = -cfg.n_layers * h  # one shared norm per layer instead of two
    elif cfg.arch == "dtp":  # each lane a Megatron shard of every layer; shared norms read once per device
        n_classic, lanes_here = 0, _lanes_per_device(cfg, devices)
        matrices = classic_layer_params(cfg) - 2 * h
        norms = 2 * h * (1 if cfg.replicated_rmsn_scale else lanes_here)
        lane_weights = cfg.n_layers * (matrices * lanes_here // cfg.lane_count + norms)
        lane_kv = kv_cache_bytes(
            n_layers=cfg.n_layers * lanes_here, n_kv_heads=cfg.n_kv_heads // cfg.lane_count, head_dim=cfg.head_dim,
            context=context, batch=batch, precision=precision,
        )  # fmt: skip
    elif cfg.arch == "kraken":
        n_classic, lanes_here = 0, _lanes_per_device(cfg, devices) * cfg.n_layers
        lane_weights = lanes_here * lane_layer_params(cfg) + cfg.lane_count * h * h  # + proj, replicated
        lane_kv = kv_cache_bytes(
            n_layers=lanes_here, n_kv_heads=cfg.lane_kv_heads, head_dim=cfg.lane_head_dim, context=context,
            batch=batch, precision=precision,
        )  # fmt: skip
    else:
        if cfg.lane_count % devices:
            raise ValueError(
                f"lane_count={cfg.lane_count} is not a multiple of devices={devices}; a TP-block model runs on G "
                f"devices only when each holds lane_count/G whole lanes (report §4.1)"
            )
        n_classic = cfg.tp_block_repetition * cfg.n_classic_layers
        lanes_here = cfg.tp_block_repetition * cfg.lane_depth * cfg.lane_count // devices
        lane_weights = lanes_here * lane_layer_params(cfg)
        if cfg.delayed_comm and cfg.comm_reception == "gated":
            lane_weights += (
                cfg.tp_block_repetition * len(cfg.delayed_sends) * cfg.lane_count // devices * (cfg.lane_hidden_size)
            )
        lane_kv = kv_cache_bytes(
            n_layers=lanes_here, n_kv_heads=cfg.lane_kv_heads, head_dim=cfg.lane_head_dim, context=context,
            batch=batch, precision=precision,
        )  # fmt: skip
    classic_weights = n_classic * classic_layer_params_per_device(cfg, devices)
    classic_kv = kv_cache_bytes(
        n_layers=n_classic, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, context=context, batch=batch,
        precision=precision, devices=devices,
    )  # fmt: skip
    head_rows = math.ceil(cfg.vocab_size / devices) if vocab_parallel_head else cfg.vocab_size
    head_weights = head_rows * h
    if cfg.arch == "dtp" and cfg.lm_head_type == "lane":  # the column blocks of the device's lanes
        head_weights = cfg.vocab_size * h * _lanes_per_device(cfg, devices)
    elif cfg.arch == "dtp" and cfg.lm_head_type == "vocab_parallel":  # the vocabulary rows of its lanes
        head_weights = cfg.vocab_size // devices * h
    return DecodeBytes(
        layer_weights=(lane_weights + classic_weights + h) * precision,  # + h: the final norm
        kv_cache=lane_kv + classic_kv,
        head=head_weights * precision,
        embedding=batch * h * precision,
    )


# ====================================================================== prediction for a config
@dataclass(frozen=True)
class Prediction:
    """Predicted decode step of one configuration on ``devices`` devices of ``hardware``."""

    hardware: str
    devices: int
    bytes_per_device: float
    syncs: int
    t_memory: float
    t_sync_total: float
    batch: int = 1

    @property
    def t_decode(self) -> float:
        return self.t_memory + self.t_sync_total

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_second(self.t_decode, self.batch)

    @property
    def sync_share(self) -> float:
        """Fraction of the step spent synchronising."""
        return self.t_sync_total / self.t_decode

    def as_dict(self) -> dict:
        return {**self.__dict__, "t_decode": self.t_decode, "tokens_per_s": self.tokens_per_s}


def predict_bytes(m_bytes_per_device: float, syncs: int, hw: Hardware, devices: int, batch: int = 1) -> Prediction:
    """Prediction from bytes already divided per device (the form measured benchmarks use)."""
    _check_devices(devices)
    t_sync_total = syncs * hw.t_sync if devices > 1 else 0.0
    return Prediction(hw.name, devices, m_bytes_per_device, syncs, t_move(m_bytes_per_device, hw.beta), t_sync_total,
                      batch)  # fmt: skip


def predict(
    cfg: ModelConfig,
    hw: Hardware,
    *,
    devices: int,
    context: int = 0,
    batch: int = 1,
    precision: float = 2,
    vocab_parallel_head: bool = False,
    communicate: bool = True,
) -> Prediction:
    """Predicted decode step of ``cfg``: Eq. 9 (Llama) / Eq. 10 (TP blocks) with the bytes of Table 2.

    ``communicate=False`` is the no-communication ceiling (the same lanes, no collective)."""
    nbytes = decode_bytes(
        cfg, devices=devices, context=context, batch=batch, precision=precision,
        vocab_parallel_head=vocab_parallel_head,
    ).total  # fmt: skip
    syncs = syncs_for_config(cfg, vocab_parallel_head) if communicate else 0
    pred = predict_bytes(nbytes, syncs, hw, devices, batch)
    if not communicate or devices == 1 or not charges_overlapped(cfg):
        return pred
    exposed = exposed_overlapped_time(cfg, hw, devices=devices, precision=precision)
    return dataclasses.replace(pred, t_sync_total=pred.t_sync_total + exposed)


# ====================================================================== schedules: overlapped syncs
# Choice (documented in README "Communication schedules"): an overlapped sync costs max(0, t_sync - t_hidden),
# where t_hidden is the memory time of the work that runs while it is in flight on one device (one sub-layer for
# Ladder, one lane attention for Kraken), and Ladder's last sum is fully exposed (the final norm needs it).
# ``hides=False`` charges every overlapped sync a full t_sync instead: what CPU/gloo runs show, where the
# communication thread competes with compute for the same cores (TOOLCHAIN.md §3). TP-block delayed sums keep
# the report's assumption (hidden when comm_length >= ``min_comm_length``) and are not charged here.
def _lanes_per_device(cfg: ModelConfig, devices: int) -> int:
    if cfg.lane_count % devices:
        raise ValueError(
            f"lane_count={cfg.lane_count} is not a multiple of devices={devices}; each device must hold "
            f"lane_count/G whole lanes"
        )
    return cfg.lane_count // devices


def charges_overlapped(cfg: ModelConfig) -> bool:
    """Whether ``predict`` charges the overlapped syncs of ``cfg`` (Ladder, Kraken, DTP; not TP-block delayed sums)."""
    return cfg.arch in ("ladder", "kraken", "dtp")


def hidden_work_per_sync(cfg: ModelConfig, *, devices: int, precision: float = 2) -> list[float]:
    """Bytes one device reads while each overlapped sync of one decode step is in flight (Ladder, Kraken, DTP)."""
    h, e = cfg.hidden_size, cfg.head_dim
    if cfg.arch == "ladder":
        q, kv = math.ceil(cfg.n_heads / devices), math.ceil(cfg.n_kv_heads / devices)
        f = math.ceil(cfg.ffn_hidden / devices)
        attn = (2 * h * q * e + 2 * h * kv * e + h) * precision
        ffn = (3 * h * f + h) * precision
        subs = [attn, ffn] * cfg.n_layers  # sync k (after sub-layer k) hides behind sub-layer k+1
        return subs[1:] + [0.0]
    if cfg.arch == "kraken":
        lanes, d, n, k = _lanes_per_device(cfg, devices), h, cfg.lane_heads, cfg.lane_kv_heads
        attn = lanes * (2 * d * n * cfg.lane_head_dim + 2 * d * k * cfg.lane_head_dim + d) * precision
        return [attn] * (cfg.n_layers - 1)
    if cfg.arch == "dtp":  # a sum started after sub-layer t of layer i is awaited at sub-layer t of layer i + δ
        weights = decode_bytes(cfg, devices=devices, precision=precision).layer_weights  # + the final norm (h)
        layer_bytes = (weights - h * precision) / cfg.n_layers
        return [cfg.broadcast_delay * layer_bytes] * overlapped_syncs_for_config(cfg)
    return []


def exposed_overlapped_time(
    cfg: ModelConfig, hw: Hardware, *, devices: int, precision: float = 2, hides: bool = True
) -> float:
    """Seconds the overlapped syncs of one decode step still add (see the choice above)."""
    if devices == 1:
        return 0.0
    work = hidden_work_per_sync(cfg, devices=devices, precision=precision)
    if not hides:
        return len(work) * hw.t_sync
    return sum(max(0.0, hw.t_sync - t_move(b, hw.beta)) for b in work)


def schedule_name(cfg: ModelConfig) -> str:
    """The communication schedule of a config: llama_tp, tp_blocks, track, palm, ladder, kraken or dtp."""
    if cfg.arch == "llama":
        return "llama_tp"
    if cfg.arch == "tp_blocks":
        return "track" if cfg.recipe == "track" else "tp_blocks"
    return cfg.arch  # palm, ladder, kraken, dtp


def speedup(baseline: Prediction, candidate: Prediction) -> float:
    """How many times faster ``candidate`` decodes than ``baseline``."""
    return baseline.t_decode / candidate.t_decode


def _check_devices(devices: int) -> None:
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")


# ====================================================================== the report's worked examples
@dataclass(frozen=True)
class ReportCheck:
    """A figure printed in the report next to what its own formula gives."""

    section: str
    quantity: str
    printed: float
    formula: float
    unit: str
    note: str = ""

    @property
    def rel_error(self) -> float:
        return (self.printed - self.formula) / self.formula


def report_checks() -> list[ReportCheck]:
    """Recompute every worked example of §3.4, §4.2 and §6.7 from Eq. 1-11."""
    h100, a100 = get_hardware("h100"), get_hardware("a100")
    m_67 = 2.2 * GB
    llama = t_decode_llama_tp(m_67, 22, h100, 8)
    block_nosync = t_decode(m_67, 0, h100, 8)
    block = t_decode_tp_blocks(m_67, 1, 1, h100, 8)
    m_70b = 71.34 * GB
    t4, t8 = t_decode_llama_tp(m_70b, 80, a100, 4), t_decode_llama_tp(m_70b, 80, a100, 8)
    sync_70b = 160 * a100.t_sync
    m_7b = 7 * GB + kv_cache_bytes(n_layers=32, n_kv_heads=32, head_dim=128, context=1000, batch=4, precision=1)
    t_7b = t_decode(m_7b, 0, h100, 1)
    layer_42 = 2.2 * GB / (8 * 22)
    return [
        ReportCheck("6.7", "TinyLlama 8xH100 step", 290, llama / US, "us", "22 layers x 2 syncs (Eq. 9)"),
        ReportCheck("6.7", "TinyLlama 8xH100 throughput", 3442, tokens_per_second(llama), "tok/s"),
        ReportCheck("6.7", "TP-block 8xH100 step", 70, block / US, "us",
                    "Eq. 10 with the 3 syncs named (1 block + 1 classic layer); printed value has no sync"),
        ReportCheck("6.7", "TP-block 8xH100 throughput", 14181, tokens_per_second(block), "tok/s",
                    f"printed value = M/(beta G) with 0 syncs = {tokens_per_second(block_nosync):.0f} tok/s"),
        ReportCheck("6.7", "speedup over TinyLlama", 4.2, llama / block, "x",
                    f"even with 0 syncs it is {llama / block_nosync:.2f}x"),
        ReportCheck("3.4", "Llama2-7B 1xH100 step (b=4, fp8)", 2.07, t_7b / 1e-3, "ms"),
        ReportCheck("3.4", "Llama2-7B throughput (b=4)", 1940, tokens_per_second(t_7b, 4), "tok/s"),
        ReportCheck("3.4", "Llama2-70B 4xA100 memory time", 8.9, (t4 - sync_70b) / 1e-3, "ms"),
        ReportCheck("3.4", "Llama2-70B 8xA100 memory time", 4.95, (t8 - sync_70b) / 1e-3, "ms",
                    "71.34 GB / 8 / 2 TB/s"),
        ReportCheck("3.4", "Llama2-70B 4xA100 sync share", 9, 100 * sync_70b / t4, "%",
                    f"sync/memory ratio {100 * sync_70b / (t4 - sync_70b):.1f}%"),
        ReportCheck("3.4", "Llama2-70B 8xA100 sync share", 16, 100 * sync_70b / t8, "%",
                    f"sync/memory ratio {100 * sync_70b / (t8 - sync_70b):.1f}%"),
        ReportCheck("3.4", "Llama2-70B KV cache (8 KV heads, avg ctx 256, bf16)", 1.34,
                    kv_cache_bytes(n_layers=80, n_kv_heads=8, head_dim=128, context=256, precision=2) / GB, "GB",
                    "printed = 2 x 80 x 512 x 8192 x 2 B: 64 KV heads at the final context"),
        ReportCheck("4.2", "bytes per lane layer (2.2 GB, 8 lanes x 22)", 12.5, layer_42 / 1e6, "MB",
                    f"the text says 2 GB, which gives {2 * GB / (8 * 22) / 1e6:.2f} MB"),
        ReportCheck("4.2", "communication_length for a free sync", 1.56, min_comm_length(layer_42, h100), "layers",
                    "a delay is whole layers: use 2"),
    ]  # fmt: skip


def main() -> None:
    print(f"{'§':<4} {'quantity':<52} {'printed':>10} {'formula':>10} {'unit':<7} {'diff':>7}  note")
    for c in report_checks():
        print(
            f"{c.section:<4} {c.quantity:<52} {c.printed:>10.4g} {c.formula:>10.4g} {c.unit:<7} "
            f"{100 * c.rel_error:>+6.1f}%  {c.note}"
        )


if __name__ == "__main__":
    main()
