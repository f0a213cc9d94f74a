"""The report's §6 experiment grids as lists of training runs (override sets for ``launch/train.py``).

A grid is a set of axes (lane count, lane depth, delayed-communication start ...). Each point of the grid is
one model whose hidden size is solved so that its total parameter count (embeddings included) matches the
scale's budget (report §6.1: "we then adapt the hidden size to achieve a similar total number of
parameters"). A point whose model cannot be built -- a delayed-communication schedule that does not fit in
the lane depth, a budget no hidden size can reach -- is kept as an *invalid* point with the reason, never
dropped, so the results table shows the hole.

Scale knobs (``Scale``) make the same grid run at paper scale on a cluster (150M parameters, 1B tokens,
1M-token batches) and at tiny scale on a CPU (a few hundred thousand parameters, a few thousand tokens).

Grids (report section / figure):
  lane_count      §6.2 / Fig. 18  lanes {1,2,4,8,16} x {sandwich, burger}, lane depth 12 + 1 classic, + Llama
  aspect_ratio    §6.3 / Fig. 19  4 lanes, 1 TP block, 1 classic, lane depth swept (aspect = lane width / depth)
  tp_blocks       §6.4 / Fig. 20  number of TP blocks with lane depth x blocks = 12, 1 classic after each
  classic_layers  §6.5 / Fig. 21  4 TP blocks of 4 lanes of depth 3, {1,2,3,4} classic layers after each
  delayed_comm    §6.6 / Fig. 22  start {0,1,2} x interleave {0..3} x length {1,2,4,6} (x comm_reception)
  seed_variance   §5.3.4 / Fig. 17b,d  N seeds x {cosine, wsd} x {burger, llama}
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tpblocks.models.config import ModelConfig
from tpblocks.models.flavors import get_flavor
from tpblocks.models.sizing import solve_hidden_size, total_parameters


# ---------------------------------------------------------------------------------------------- scales
@dataclass(frozen=True, kw_only=True)
class Scale:
    """Knobs that size every run of a grid. ``paper`` reproduces Table 6; ``tiny`` runs in seconds on a CPU."""

    name: str
    budget: int  # total parameters, embeddings included (§6.1 used 135M or 150M)
    tokens: int  # training tokens per run (Table 6: 1B)
    tokens_per_step: int  # effective batch in tokens (Table 6: 1M)
    seq_len: int
    vocab_size: int  # must match the tokenizer the trainer uses, since embeddings count towards the budget
    # True: the trainer trains its tokenizer on the data, so pass data.vocab_size too. False: the data
    # config names a tokenizer file (the paper's Llama-2 32k) whose size vocab_size must equal.
    train_tokenizer: bool = False
    n_heads: int  # classic-layer attention heads; Burger lanes use the same, Sandwich lanes n_heads / L
    n_kv_heads: int
    micro_batch: int | None = None  # sequences per device per micro-step; None = trainer default
    seeds: int = 10  # seed_variance: runs per (arch, scheduler) (§5.3.4 used 10 cosine, 5 WSD)
    budget_tolerance: float = 0.01
    # Extra Hydra overrides for every run (data set, wandb mode...). Passed verbatim.
    overrides: tuple[str, ...] = ()
    # §6.3 lane depths per recipe, as printed in the report for the paper scale.
    aspect_depths: dict[str, tuple[int, ...]] = field(default_factory=dict)
    delayed_lane_depth: int = 12  # lane depth of the §6.6 model (the report does not print it)

    def __post_init__(self) -> None:
        for name in ("budget", "tokens", "tokens_per_step", "seq_len", "vocab_size", "n_heads", "n_kv_heads", "seeds"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"scale.{name}={getattr(self, name)} must be a positive integer")
        if self.tokens < self.tokens_per_step:
            raise ValueError(
                f"scale.tokens={self.tokens} is less than one step of tokens_per_step={self.tokens_per_step}; "
                f"raise tokens or lower tokens_per_step"
            )
        if self.tokens_per_step % self.seq_len:
            raise ValueError(
                f"scale.tokens_per_step={self.tokens_per_step} must be a multiple of seq_len={self.seq_len}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"scale.n_kv_heads={self.n_kv_heads} must divide scale.n_heads={self.n_heads}")

    @property
    def max_steps(self) -> int:
        return self.tokens // self.tokens_per_step

    def replace(self, **changes: Any) -> Scale:
        """A copy with knobs changed; values given as strings (from the command line) are cast."""
        cast: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in types:
                raise ValueError(f"unknown scale knob {key!r}; known: {', '.join(sorted(types))}")
            if isinstance(value, str) and key not in ("name",):
                if key == "overrides":
                    value = tuple(v for v in value.split(" ") if v)
                elif key == "aspect_depths":
                    raise ValueError("scale.aspect_depths cannot be set as a knob; set the lane_depth axis instead")
                elif key == "train_tokenizer":
                    value = value.lower() in ("1", "true", "yes")
                elif key == "budget_tolerance":
                    value = float(value)
                elif key == "micro_batch" and value.lower() in ("none", "null"):
                    value = None
                else:
                    value = int(float(value))  # accepts 150e6
            cast[key] = value
        return dataclasses.replace(self, **cast)


SCALES: dict[str, Scale] = {
    "paper": Scale(
        name="paper", budget=150_000_000, tokens=1_048_576_000, tokens_per_step=1_048_576, seq_len=2048,
        vocab_size=32001, n_heads=12, n_kv_heads=4, seeds=10,
        aspect_depths={"burger": (8, 20, 32), "sandwich": (3, 8, 16, 20, 32)}, delayed_lane_depth=12,
        # FineWeb-Edu-dedup (Table 6); the Llama-2 tokenizer file must be given: data.tokenizer_path=...
        overrides=("data=fineweb_edu_dedup",),
    ),
    # ~500k parameters, 12 steps of 1k tokens: one run takes seconds on one CPU core.
    "tiny": Scale(
        name="tiny", budget=500_000, tokens=12_288, tokens_per_step=1024, seq_len=64, vocab_size=512,
        n_heads=4, n_kv_heads=2, micro_batch=8, seeds=3, train_tokenizer=True,
        aspect_depths={"burger": (2, 4, 8), "sandwich": (2, 4, 8)}, delayed_lane_depth=6,
        # Small held-out evaluations and one checkpoint at the end: at this scale they would cost more than training.
        overrides=("wandb.mode=disabled", "train.eval_tokens=2048", "train.eval_batch=8", "train.checkpoint_every=0"),
    ),
    # Between the two (docs/results.md): 3M parameters, context 256, 110 steps of 4k tokens (0.45M tokens):
    # 2-6 minutes per run on ONE CPU core (an 8-lane Burger trains at ~850 tokens/s there, a Llama at ~2600).
    # lr 2e-3: the paper's 3e-4 barely moves a 3M model in 110 steps (measured: 8.3 -> 7.8 in 20 steps).
    # Real text: the FineWeb sample of ../shared/data (relative to the repository root, where the tasks run;
    # replace with --override data.path=...), a 4096-piece BPE trained on it (the Llama-2 32k vocabulary
    # would be ~85 % of a 3M budget as embedding alone). The held-out set is the stream's first 100k tokens,
    # the same for every run (data.seed is fixed). The eval sees 32k of them every 25 steps.
    "laptop": Scale(
        name="laptop", budget=3_000_000, tokens=450_560, tokens_per_step=4096, seq_len=256, vocab_size=4096,
        n_heads=4, n_kv_heads=2, micro_batch=16, seeds=3, train_tokenizer=True,
        aspect_depths={"burger": (4, 8, 12), "sandwich": (4, 8, 12)}, delayed_lane_depth=12,
        overrides=(
            "data=local", "data.path=../shared/data/fineweb_sample", "data.heldout_tokens=100000",
            "data.tokenizer_train_bytes=20000000", "optim.lr=2e-3", "wandb.mode=disabled", "train.eval_every=40",
            "train.eval_tokens=16384", "train.eval_batch=16", "train.checkpoint_every=0", "train.progress=false",
        ),
    ),
}  # fmt: skip


def get_scale(name: str, **knobs: Any) -> Scale:
    """A named scale with knobs replaced (``get_scale("tiny", budget="500e3")``)."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; known: {', '.join(SCALES)}")
    return SCALES[name].replace(**knobs) if knobs else SCALES[name]


# ---------------------------------------------------------------------------------------------- points
@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One run of a grid: its coordinates, the solved model (or why there is none) and training overrides."""

    name: str  # unique within the sweep, used as the run directory name
    coords: dict[str, Any]  # grid coordinates (what the plots put on their axes)
    model: ModelConfig | None
    train_overrides: tuple[str, ...] = ()
    invalid_reason: str | None = None

    @property
    def valid(self) -> bool:
        return self.model is not None

    @property
    def n_params(self) -> int | None:
        return total_parameters(self.model) if self.model is not None else None


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


BASE_FLAVORS = {"llama": "debug_llama", "sandwich": "debug_sandwich", "burger": "debug_burger"}


def model_overrides(cfg: ModelConfig) -> list[str]:
    """Hydra overrides that make the trainer build exactly ``cfg``.

    The trainer builds ``get_flavor(model.flavor, **model.overrides)`` (contract of ``conf/model``); we name a
    small flavor of the same arch and recipe and force-add (``++``) every field that differs from it, so the
    override set is independent of which ``model`` group is the trainer's default.
    """
    key = "llama" if cfg.arch == "llama" else cfg.recipe
    flavor = BASE_FLAVORS[key]
    base = get_flavor(flavor).to_dict()
    out = [f"model.flavor={flavor}"]
    for name, value in cfg.to_dict().items():
        if name != "extra" and base.get(name) != value:
            out.append(f"++model.overrides.{name}={_hydra_value(value)}")
    return out


def train_overrides(scale: Scale, seed: int | None = None, scheduler: str | None = None) -> tuple[str, ...]:
    out = [
        f"train.max_steps={scale.max_steps}",
        f"train.tokens_per_step={scale.tokens_per_step}",
        f"data.seq_len={scale.seq_len}",
    ]
    if scale.train_tokenizer:
        out.append(f"data.vocab_size={scale.vocab_size}")
    if scale.micro_batch is not None:
        out.append(f"train.micro_batch={scale.micro_batch}")
    if seed is not None:
        out.append(f"seed={seed}")
    if scheduler is not None:
        out.append(f"scheduler={scheduler}")
    return (*out, *scale.overrides)


def _lane_heads(scale: Scale, recipe: str, lane_count: int) -> tuple[int, int]:
    """Burger lanes are h wide and keep the classic head count; Sandwich lanes are h/L wide, so their head
    count shrinks with L to keep the head dim near the classic one."""
    if recipe == "burger":
        return scale.n_heads, scale.n_kv_heads
    heads = max(1, scale.n_heads // lane_count)
    return heads, math.gcd(heads, scale.n_kv_heads)


def tp_model(scale: Scale, *, recipe: str, lane_count: int, lane_depth: int, blocks: int = 1, classic: int = 1,
             **fields: Any) -> ModelConfig:
    """A TP-block model of the scale's vocabulary and heads, hidden size solved to the budget (§6.1:
    intermediate size twice the width, lanes and classic layers alike). Raises ValueError when invalid."""
    lane_heads, lane_kv = _lane_heads(scale, recipe, lane_count)
    # Any width satisfying the split and head constraints; the solver then picks the real one.
    placeholder = math.lcm(2 * scale.n_heads, 2 * lane_heads * lane_count, lane_count)
    base = ModelConfig(
        arch="tp_blocks", recipe=recipe, vocab_size=scale.vocab_size, hidden_size=placeholder,
        n_heads=scale.n_heads, n_kv_heads=scale.n_kv_heads, ffn_factor=2.0, lane_count=lane_count,
        lane_depth=lane_depth, tp_block_repetition=blocks, n_classic_layers=classic, lane_n_heads=lane_heads,
        lane_n_kv_heads=lane_kv, lane_ffn_factor=2.0, max_seq_len=scale.seq_len, **fields,
    )  # fmt: skip
    return solve_hidden_size(base, scale.budget, tolerance=scale.budget_tolerance)


def llama_model(scale: Scale, n_layers: int) -> ModelConfig:
    base = ModelConfig(
        arch="llama", vocab_size=scale.vocab_size, hidden_size=2 * scale.n_heads, n_heads=scale.n_heads,
        n_kv_heads=scale.n_kv_heads, ffn_factor=2.0, n_layers=n_layers, max_seq_len=scale.seq_len,
    )  # fmt: skip
    return solve_hidden_size(base, scale.budget, tolerance=scale.budget_tolerance)


_SHORT = {"lane_count": "L", "lane_depth": "D", "tp_blocks": "B", "n_classic_layers": "C", "comm_start": "s",
          "comm_interleave": "i", "comm_length": "n", "seed": "seed"}  # fmt: skip


def point_name(coords: dict[str, Any]) -> str:
    parts = []
    for key, value in coords.items():
        parts.append(str(value) if key not in _SHORT else f"{_SHORT[key]}{value}")
    return "_".join(parts)


def make_point(coords: dict[str, Any], build: Callable[[], ModelConfig], train: tuple[str, ...]) -> SweepPoint:
    """Build the point's model; a ValueError (invalid combination) becomes an invalid point, not a crash."""
    try:
        cfg = build()
    except ValueError as err:
        return SweepPoint(name=point_name(coords), coords=coords, model=None, invalid_reason=str(err))
    return SweepPoint(name=point_name(coords), coords=coords, model=cfg, train_overrides=train)


# ---------------------------------------------------------------------------------------------- grids
def _values(values: dict[str, Iterable[Any]], key: str, default: Iterable[Any]) -> list[Any]:
    return list(values.get(key, default))


def lane_count_grid(scale: Scale, values: dict[str, list[Any]]) -> list[SweepPoint]:
    """§6.2 / Fig. 18: lane depth 12 plus one classic layer; a Llama of the same depth (13) as baseline."""
    depth = _values(values, "lane_depth", [12])[0]
    train = train_overrides(scale)
    points = []
    for recipe in _values(values, "recipe", ["sandwich", "burger", "llama"]):
        if recipe == "llama":
            coords = {"recipe": "llama"}
            points.append(make_point(coords, lambda: llama_model(scale, depth + 1), train))
            continue
        for lanes in _values(values, "lane_count", [1, 2, 4, 8, 16]):
            coords = {"recipe": recipe, "lane_count": int(lanes)}
            points.append(make_point(
                coords, lambda r=recipe, n=int(lanes): tp_model(scale, recipe=r, lane_count=n, lane_depth=depth),
                train,
            ))  # fmt: skip
    return points


def aspect_ratio_grid(scale: Scale, values: dict[str, list[Any]]) -> list[SweepPoint]:
    """§6.3 / Fig. 19: 4 lanes, 1 TP block, 1 classic layer; the lane depth is set and the width solved."""
    train = train_overrides(scale)
    lanes = int(_values(values, "lane_count", [4])[0])
    points = []
    for recipe in _values(values, "recipe", ["sandwich", "burger"]):
        for depth in _values(values, "lane_depth", scale.aspect_depths.get(recipe, (2, 4, 8))):
            coords = {"recipe": recipe, "lane_depth": int(depth)}
            points.append(make_point(
                coords, lambda r=recipe, d=int(depth): tp_model(scale, recipe=r, lane_count=lanes, lane_depth=d),
                train,
            ))  # fmt: skip
    return points


def tp_blocks_grid(scale: Scale, values: dict[str, list[Any]]) -> list[SweepPoint]:
    """§6.4 / Fig. 20: lane depth x number of TP blocks = 12 (total depth 12 + blocks), 1 classic after each."""
    train = train_overrides(scale)
    total = int(_values(values, "total_lane_depth", [12])[0])
    lanes = int(_values(values, "lane_count", [4])[0])
    points = []
    for recipe in _values(values, "recipe", ["sandwich", "burger"]):
        for blocks in _values(values, "tp_blocks", [b for b in (1, 2, 3, 4, 6, 12) if total % b == 0]):
            blocks = int(blocks)
            coords = {"recipe": recipe, "tp_blocks": blocks, "lane_depth": total // blocks}

            def build(r=recipe, b=blocks) -> ModelConfig:
                if total % b:
                    raise ValueError(f"tp_blocks={b} does not divide the total lane depth {total}")
                return tp_model(scale, recipe=r, lane_count=lanes, lane_depth=total // b, blocks=b)

            points.append(make_point(coords, build, train))
    return points


def classic_layers_grid(scale: Scale, values: dict[str, list[Any]]) -> list[SweepPoint]:
    """§6.5 / Fig. 21: 4 TP blocks of 4 lanes of depth 3, then 1..4 classic layers after each block."""
    train = train_overrides(scale)
    points = []
    for recipe in _values(values, "recipe", ["sandwich", "burger"]):
        for classic in _values(values, "n_classic_layers", [1, 2, 3, 4]):
            coords = {"recipe": recipe, "n_classic_layers": int(classic)}
            points.append(make_point(
                coords,
                lambda r=recipe, c=int(classic): tp_model(scale, recipe=r, lane_count=4, lane_depth=3, blocks=4,
                                                          classic=c),
                train,
            ))  # fmt: skip
    return points


def delayed_comm_grid(scale: Scale, values: dict[str, list[Any]]) -> list[SweepPoint]:
    """§6.6 / Fig. 22: every (start, interleave, length), per ``comm_reception`` (gated default; the report
    summed); points whose first send cannot be received inside the lane depth are invalid (ModelConfig
    raises) and recorded as such."""
    train = train_overrides(scale)
    depth = int(_values(values, "lane_depth", [scale.delayed_lane_depth])[0])
    points = []
    for recipe, reception in itertools.product(
        _values(values, "recipe", ["sandwich"]), _values(values, "comm_reception", ["gated"])
    ):
        axes = itertools.product(
            _values(values, "comm_start", [0, 1, 2]),
            _values(values, "comm_interleave", [0, 1, 2, 3]),
            _values(values, "comm_length", [1, 2, 4, 6]),
        )
        for start, inter, length in axes:
            coords = {"recipe": recipe, "comm_start": int(start), "comm_interleave": int(inter),
                      "comm_length": int(length)}  # fmt: skip
            if reception != "gated":  # the default reception keeps the report's point names
                coords["comm_reception"] = reception
            points.append(make_point(
                coords,
                lambda r=recipe, s=int(start), i=int(inter), n=int(length), rec=reception: tp_model(
                    scale, recipe=r, lane_count=4, lane_depth=depth, delayed_comm=True, comm_start=s,
                    comm_interleave=i, comm_length=n, comm_reception=rec,
                ),
                train,
            ))  # fmt: skip
    return points


def seed_variance_grid(scale: Scale, values: dict[str, list[Any]]) -> list[SweepPoint]:
    """§5.3.4 / Fig. 17b,d: the Table 15 pair (Burger: 4 lanes x depth 4 x 2 blocks + 1 classic; Llama 13
    layers), both solved to the budget, trained with N seeds under cosine and WSD."""
    n_seeds = int(_values(values, "seeds", [scale.seeds])[0])
    points = []
    for scheduler in _values(values, "scheduler", ["cosine", "wsd"]):
        for arch in _values(values, "arch", ["burger", "llama"]):
            for seed in _values(values, "seed", range(n_seeds)):
                coords = {"arch": arch, "scheduler": scheduler, "seed": int(seed)}
                if arch == "llama":
                    build = lambda: llama_model(scale, 13)  # noqa: E731
                else:
                    build = lambda a=arch: tp_model(scale, recipe=a, lane_count=4, lane_depth=4, blocks=2)  # noqa: E731
                points.append(make_point(coords, build, train_overrides(scale, seed=int(seed), scheduler=scheduler)))
    return points


GRIDS: dict[str, Callable[[Scale, dict[str, list[Any]]], list[SweepPoint]]] = {
    "lane_count": lane_count_grid,
    "aspect_ratio": aspect_ratio_grid,
    "tp_blocks": tp_blocks_grid,
    "classic_layers": classic_layers_grid,
    "delayed_comm": delayed_comm_grid,
    "seed_variance": seed_variance_grid,
}


def with_seeds(points: Sequence[SweepPoint], seeds: Sequence[int]) -> list[SweepPoint]:
    """Every point once per seed (model initialisation; the data order stays fixed): ``--set seed=0,1,2`` on
    any grid, for the seed spread beside its differences. The seed becomes a coordinate and the name's tail."""
    out = []
    for seed in seeds:  # seed-major: an array cut short still holds whole grids, one per finished seed
        for point in points:
            coords = {**point.coords, "seed": seed}
            train = (*point.train_overrides, f"seed={seed}") if point.valid else ()
            out.append(dataclasses.replace(point, name=point_name(coords), coords=coords, train_overrides=train))
    return out


def expand(grid: str, scale: Scale, values: dict[str, list[Any]] | None = None) -> list[SweepPoint]:
    """All points of ``grid`` at ``scale``; ``values`` restricts or replaces axis values
    (``{"lane_count": [1, 2, 4], "recipe": ["sandwich"]}``); a ``seed`` axis repeats every point per seed."""
    if grid not in GRIDS:
        raise ValueError(f"unknown sweep grid {grid!r}; known: {', '.join(GRIDS)}")
    values = dict(values or {})
    seeds = values.pop("seed", None) if grid != "seed_variance" else None
    points = GRIDS[grid](scale, values)
    if seeds is not None:
        points = with_seeds(points, [int(s) for s in seeds])
    names = [p.name for p in points]
    assert len(set(names)) == len(names), f"duplicate point names in {grid}: {names}"
    return points


def parse_values(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["lane_count=1,2,4", "recipe=sandwich"]`` -> ``{"lane_count": [1, 2, 4], "recipe": ["sandwich"]}``."""
    out: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"axis value {item!r} must look like AXIS=v1,v2,...")
        key, raw = item.split("=", 1)
        vals: list[Any] = []
        for v in raw.split(","):
            v = v.strip()
            try:
                vals.append(int(v))
            except ValueError:
                vals.append(v)
        out[key.strip()] = vals
    return out
