"""Typed run configuration: the Hydra tree (conf/) composed into frozen, validated dataclasses.

Hydra composes YAML into an ``omegaconf.DictConfig``; ``RunConfig.from_dictconfig`` turns it into the typed
objects below, each of which checks itself in ``__post_init__`` and raises a ``ValueError`` naming the field
(``train.tokens_per_step=1000 is not a multiple of ...``) before any process group, model or data exists.

The dataclasses hold the only defaults. ``register_hydra_defaults`` puts them into Hydra's ConfigStore as
``tpblocks_defaults``, the first entry of conf/config.yaml's defaults list, so the YAML under conf/ sets only what
differs and every field stays overridable as ``section.key=value`` (Hydra refuses keys its composed config lacks).
``compose(overrides)`` is what ``launch/train.py`` sees, for tests, sweeps and benchmarks.

Groups and the dataclass each becomes:
  model      ModelChoice   -> tpblocks.models.ModelConfig  (a zoo ``flavor`` + field ``overrides`` [+ ``budget``])
  data       tpblocks.data.DataConfig                       (owned by tpblocks/data/)
  optim      OptimConfig     AdamW (the only optimizer of the report's protocol, Table 6)
  scheduler  SchedulerConfig cosine (1 cycle) | wsd (warm-up, stable, decay)
  trainer    TrainerConfig   backend ddp | fsdp (FSDP2 on the dp mesh) | deepspeed (ZeRO-1/2)
  train      TrainConfig     steps, effective batch in tokens, micro-batch, eval/log/checkpoint cadence
  wandb      WandbConfig     offline by default, online when asked, disabled = never imported
  parallel   ParallelConfig  lane degree: ``lane`` ranks hold one model (TP-block lanes / Megatron shards); the
                             rest of the world is data parallel (tpblocks.parallel)
  layer_parallel  tpblocks.parallel.mgrit.MGRITConfig  layer-parallel training by MGRIT (off by default)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpblocks.data.config import DataConfig
from tpblocks.models import ModelConfig, get_flavor, solve_hidden_size
from tpblocks.models.flavors import FLAVORS
from tpblocks.parallel.dims import check_lane_degree, check_vocab_parallel_head
from tpblocks.parallel.mgrit.config import MGRITConfig
from tpblocks.typed import check_fields, check_known, from_mapping, refuse_unknown
from tpblocks.typed import require as _require

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULERS = ("cosine", "wsd")
BACKENDS = ("ddp", "fsdp", "deepspeed")
WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
CPU_ALLOCATORS = ("retain", "system")


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{section}.{name}={value} must be > 0")


# ---------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """A zoo flavor plus field overrides; ``budget`` (parameters) re-solves the hidden size (report §6.1)."""

    flavor: str = "debug_burger"
    overrides: dict = field(default_factory=dict)
    budget: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "model")
        known_flavors = ", ".join(sorted(FLAVORS))
        _require(self.flavor in FLAVORS, f"model.flavor={self.flavor!r} is unknown; known: {known_flavors}")
        check_known(ModelConfig, self.overrides, "model.overrides")
        _require(self.budget is None or self.budget > 0, f"model.budget={self.budget} must be a positive integer")

    def build(self) -> ModelConfig:
        """The ModelConfig to train (flavor -> overrides -> budget). Errors name ``model.*``."""
        try:
            cfg = get_flavor(self.flavor, **self.overrides)
            if self.budget is not None:
                cfg = solve_hidden_size(cfg, int(self.budget))
                cfg = cfg.replace(extra={**cfg.extra, "budget": int(self.budget)})
        except ValueError as err:
            if str(err).partition("=")[0] in self.overrides:  # the user's own override: name it as they wrote it
                raise ValueError(f"model.overrides.{err}") from err
            raise ValueError(f"model (flavor={self.flavor!r}): {err}") from err
        return cfg


# ---------------------------------------------------------------------------------------------------- optim
@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW (Table 6). ``lr`` defaults to 3e-4: §5.3.4 settles on it after the variance study (Table 6's 0.003
    predates it and caused loss spikes, §5.3.3)."""

    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        _require(self.name == "adamw", f"optim.name={self.name!r} is unknown; only 'adamw' is implemented")
        _positive("optim", self, "lr", "eps")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"optim.{name}={value} must be in [0, 1)")
        _require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")


# ---------------------------------------------------------------------------------------------------- scheduler
@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Learning-rate shape as a multiple of ``optim.lr`` (see tpblocks/train/schedulers.py)."""

    name: str = "cosine"
    warmup_fraction: float = 0.1  # Table 6: 10% of the steps
    min_lr_ratio: float = 0.0  # floor of the cosine / end of the WSD decay, as a fraction of optim.lr
    decay_fraction: float = 0.2  # wsd only: the last 20% of the steps decay linearly (Hägele et al. 2024)

    def __post_init__(self) -> None:
        check_fields(self, "scheduler")
        _require(self.name in SCHEDULERS, f"scheduler.name={self.name!r} is unknown; choose one of {SCHEDULERS}")
        _require(0 <= self.warmup_fraction < 1, f"scheduler.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        _require(0 <= self.min_lr_ratio <= 1, f"scheduler.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(0 < self.decay_fraction <= 1, f"scheduler.decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.name == "wsd":
            _require(
                self.warmup_fraction + self.decay_fraction <= 1,
                f"scheduler.warmup_fraction + scheduler.decay_fraction = "
                f"{self.warmup_fraction + self.decay_fraction} must be <= 1 (no room left for the stable phase)",
            )


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Data-parallel backend. ``device=auto`` takes CUDA when present (nccl) and the CPU otherwise (gloo)."""

    backend: str = "ddp"
    device: str = "auto"
    zero_stage: int = 1  # deepspeed only
    dist_timeout_s: int = 600  # s; a stalled rank surfaces (named) after this, see tpblocks/train/faults.py
    # On CPU: "retain" keeps freed memory in the process (no page faults on every step's activations,
    # tpblocks/train/cpu_allocator.py); "system" leaves glibc's defaults.
    cpu_allocator: str = "retain"

    def __post_init__(self) -> None:
        check_fields(self, "trainer")
        _require(
            self.cpu_allocator in CPU_ALLOCATORS,
            f"trainer.cpu_allocator={self.cpu_allocator!r} is unknown; choose one of {CPU_ALLOCATORS}",
        )
        _require(self.backend in BACKENDS, f"trainer.backend={self.backend!r} is unknown; choose one of {BACKENDS}")
        _require(self.device in DEVICES, f"trainer.device={self.device!r} is unknown; choose one of {DEVICES}")
        _require(
            self.zero_stage in (0, 1, 2),
            f"trainer.zero_stage={self.zero_stage} is not supported; use 1 or 2 (0 = plain data parallel)",
        )
        _positive("trainer", self, "dist_timeout_s")


# ---------------------------------------------------------------------------------------------------- train
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Steps and batch. The effective batch is ``tokens_per_step`` tokens, reached by gradient accumulation:
    accumulation = tokens_per_step / (micro_batch x seq_len x world_size), which must be a whole number."""

    # The defaults are the quickstart's (`python launch/train.py`: a tiny Burger, a few minutes on 2 CPU cores).
    max_steps: int = 100
    tokens_per_step: int = 4096  # effective batch (Table 6: 1M = 2^20; experiments set it)
    micro_batch: int = 8  # sequences per rank per forward pass
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    eval_every: int = 25  # steps between held-out evaluations (also at step 1 and the last step); 0 = never
    eval_tokens: int = 16384  # held-out tokens per evaluation (the protocol keeps 400k; smaller here = faster)
    eval_batch: int = 16
    log_every: int = 1
    checkpoint_every: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2  # newest kept; older complete checkpoints are deleted
    # Write checkpoints in a background thread (torch.distributed.checkpoint.async_save): training goes on while
    # the staged copy is written; the checkpoint is published when the write has finished (next save or run end).
    async_checkpoint: bool = False
    resume: str = "auto"  # auto = latest complete checkpoint of run_dir if any; none = start fresh; or a path
    compile: bool = False  # torch.compile the model (worth it on GPU; cold compiles cost minutes on CPU)
    progress: bool = True  # tqdm bar on rank 0
    # End of a completed run (rank 0): <run_dir>/loss_curve.png, then a greedy sample of this many tokens from the
    # final checkpoint after ``sample_prompt``, and the launch/generate.py command to continue. 0 = no sample.
    sample_tokens: int = 32
    sample_prompt: str = "The"

    def __post_init__(self) -> None:
        check_fields(self, "train")
        _positive("train", self, "max_steps", "tokens_per_step", "micro_batch", "eval_tokens", "eval_batch")
        _positive("train", self, "log_every", "keep_checkpoints")
        for name in ("eval_every", "checkpoint_every", "sample_tokens"):
            value = getattr(self, name)
            _require(value >= 0, f"train.{name}={value} must be >= 0 (0 disables it)")
        _require(self.precision in PRECISIONS, f"train.precision={self.precision!r} must be one of {PRECISIONS}")
        _require(bool(self.resume), "train.resume must be 'auto', 'none' or a checkpoint path")

    def bf16_on(self, device_type: str) -> bool:
        """Whether the run computes in bf16 on ``device_type``: ``precision=bf16``, or ``auto`` on CUDA."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    def grad_accumulation(self, seq_len: int, world_size: int) -> int:
        """Micro-steps per optimizer step; ValueError when the effective batch cannot be reached exactly."""
        per_pass = self.micro_batch * seq_len * world_size
        if self.tokens_per_step % per_pass:
            lower = max(per_pass, self.tokens_per_step // per_pass * per_pass)
            raise ValueError(
                f"train.tokens_per_step={self.tokens_per_step} is not a multiple of train.micro_batch "
                f"({self.micro_batch}) x data.seq_len ({seq_len}) x world size ({world_size}) = {per_pass}; "
                f"use e.g. train.tokens_per_step={lower} or {lower + per_pass}, or change train.micro_batch"
            )
        return self.tokens_per_step // per_pass


# ---------------------------------------------------------------------------------------------------- wandb
@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """Weights & Biases. ``offline`` writes <run_dir>/wandb (sync later with ``wandb sync``); ``disabled`` never
    imports wandb. The YAML default reads the WANDB_MODE environment variable, so CI can force a mode."""

    mode: str = "offline"
    project: str = "tpblocks"
    entity: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, "wandb")
        _require(self.mode in WANDB_MODES, f"wandb.mode={self.mode!r} is unknown; choose one of {WANDB_MODES}")


# ---------------------------------------------------------------------------------------------------- parallel
@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Lane (= tensor) parallel degree. ``lane=G`` > 1: each group of G consecutive ranks holds one model, rank g
    keeping lanes [g*L/G, (g+1)*L/G) of every TP block and Megatron shards of classic layers; the world is a
    (dp, lane) mesh with dp = world / lane data-parallel replicas. ``lane=1``: plain data parallelism.

    ``vocab_parallel_head``: with ``lane`` > 1 the output head is also split by vocabulary rows over the lane
    group (Megatron's vocabulary-parallel head) and trained by ``vocab_parallel_cross_entropy``: two all-reduces
    of (b, s) numbers instead of every rank computing all V logits. Needs an untied head. With ``lane=1`` there
    is nothing to split and the head stays whole."""

    lane: int = 1
    vocab_parallel_head: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "parallel")
        _require(
            self.lane >= 1,
            f"parallel.lane={self.lane!r} must be an integer >= 1 (1 = every rank holds the whole model)",
        )

    def dims(self, world_size: int) -> tuple[int, int]:
        """(dp, lane) for ``world_size`` ranks; ValueError when the lane degree does not divide it."""
        _require(
            world_size % self.lane == 0,
            f"parallel.lane={self.lane} does not divide the world size {world_size}; launch a multiple of "
            f"{self.lane} ranks (torchrun --nproc_per_node={self.lane}) or set parallel.lane to a divisor of "
            f"{world_size}",
        )
        return world_size // self.lane, self.lane


# ---------------------------------------------------------------------------------------------------- run
# Top-level keys of a composed config that are not RunConfig fields but are legitimately there: ``sweep`` is read
# by launch/slurm/submit.py (conf/experiment/sweep_*.yaml), ``hydra`` by Hydra itself.
_FOREIGN_TOP_KEYS = ("sweep", "hydra")
_SECTIONS = ("model", "data", "optim", "scheduler", "trainer", "train", "wandb", "parallel", "layer_parallel")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one training run needs, validated. ``model`` is the resolved ModelConfig."""

    model: ModelConfig
    model_choice: ModelChoice
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    layer_parallel: MGRITConfig = field(default_factory=MGRITConfig)
    seed: int = 0
    run_dir: str = "outputs/run"
    name: str = "default"  # experiment name (summary.json "experiment", wandb run name)

    def __post_init__(self) -> None:
        check_fields(self)
        _require(bool(self.run_dir), "run_dir must be a non-empty path")
        _require(self.seed >= 0, f"seed={self.seed} must be >= 0")
        seq_len = self.seq_len
        _require(seq_len > 0, f"data.seq_len={seq_len} must be > 0")
        _require(
            self.model.max_seq_len >= seq_len,
            f"data.seq_len={seq_len} exceeds the model's max_seq_len={self.model.max_seq_len}; "
            f"lower data.seq_len or set model.overrides.max_seq_len={seq_len}",
        )
        # The world size is only known at launch; world 1 at least must fit (the trainer re-checks with the real one).
        self.train.grad_accumulation(seq_len, 1)
        self._check_parallel()

    def _check_parallel(self) -> None:
        """Combinations of lane parallelism, layer parallelism and the backend that cannot work."""
        lane, mgrit = self.parallel.lane, self.layer_parallel.enabled
        if lane > 1:
            _require(
                self.trainer.backend != "deepspeed",
                f"parallel.lane={lane} needs trainer=ddp or trainer=fsdp: DeepSpeed ZeRO would partition optimizer "
                f"state across ranks that hold different lanes; use trainer=fsdp (shards over dp) or parallel.lane=1",
            )
            try:
                check_lane_degree(self.model, lane)
            except ValueError as err:
                raise ValueError(f"parallel.lane={lane}: {err}") from err
            if self.parallel.vocab_parallel_head:
                self._check_vocab_parallel_head(lane)
        if mgrit:
            _require(
                lane == 1,
                f"layer_parallel.enabled=true with parallel.lane={lane}: layer-parallel MGRIT runs replicated "
                f"weights on every rank and cannot be combined with lane sharding. Set parallel.lane=1 or "
                f"layer_parallel.enabled=false",
            )
            _require(
                self.trainer.backend == "ddp",
                f"layer_parallel.enabled=true needs trainer=ddp (not {self.trainer.backend}): MGRIT runs the whole "
                f"weights on every rank and already gives each the full gradient, there is nothing to shard or "
                f"average over data-parallel ranks. Use trainer=ddp",
            )

    def _check_vocab_parallel_head(self, lane: int) -> None:
        m = self.model
        _require(
            not m.tie_embeddings,
            "parallel.vocab_parallel_head=true with model.tie_embeddings=true: the embedding stays whole on every "
            "rank while the head would be split by vocabulary rows, so they could not stay tied; set "
            "model.overrides.tie_embeddings=false or parallel.vocab_parallel_head=false",
        )
        try:
            check_vocab_parallel_head(m, lane)
        except ValueError as err:
            raise ValueError(f"parallel.vocab_parallel_head=true with parallel.lane={lane}: {err}") from err

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def flavor(self) -> str:
        return self.model_choice.flavor

    @classmethod
    def from_dictconfig(cls, cfg: Any) -> RunConfig:
        """Build from a composed Hydra config (DictConfig or plain dict). Raises ValueError naming the field."""
        from omegaconf import DictConfig, OmegaConf

        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        for key in ("model", "data"):
            _require(key in raw and raw[key] is not None, f"the config has no '{key}' group; add {key}=... ")
        top_keys = ("seed", "run_dir", "name")
        given = {k: v for k, v in raw.items() if k not in _FOREIGN_TOP_KEYS}
        refuse_unknown(given, [*_SECTIONS, *top_keys], "the config", hint="(e.g. optim.lr=0.01, not +lr=0.01)")
        model_raw = dict(raw["model"]) if isinstance(raw["model"], dict) else raw["model"]
        if isinstance(model_raw, dict):
            model_raw["overrides"] = model_raw.get("overrides") or {}
        choice = from_mapping(ModelChoice, model_raw, "model")
        top = {k: raw[k] for k in top_keys if k in raw}
        data = from_mapping(DataConfig, raw["data"], "data")  # first: model sizes interpolate data.seq_len
        return cls(
            model=choice.build(),
            model_choice=choice,
            data=data,
            optim=from_mapping(OptimConfig, raw.get("optim"), "optim"),
            scheduler=from_mapping(SchedulerConfig, raw.get("scheduler"), "scheduler"),
            trainer=from_mapping(TrainerConfig, raw.get("trainer"), "trainer"),
            train=from_mapping(TrainConfig, raw.get("train"), "train"),
            wandb=from_mapping(WandbConfig, raw.get("wandb"), "wandb"),
            parallel=from_mapping(ParallelConfig, raw.get("parallel"), "parallel"),
            layer_parallel=_layer_parallel(raw.get("layer_parallel")),
            **top,
        )


def _layer_parallel(values: dict | None) -> MGRITConfig:
    try:
        return MGRITConfig.from_dict(values)
    except (ValueError, TypeError) as err:  # MGRITConfig names the field; say which block it is in
        message = str(err)
        raise ValueError(message if message.startswith("layer_parallel") else f"layer_parallel.{message}") from err


# ---------------------------------------------------------------------------------------------------- Hydra
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULTS_NAME = "tpblocks_defaults"  # the first entry of conf/config.yaml's defaults list


def hydra_defaults() -> dict:
    """``{section: {field: default}}`` of every config dataclass: the base that conf/ overrides."""
    sections = {
        "model": ModelChoice(),
        "data": DataConfig(),
        "optim": OptimConfig(),
        "scheduler": SchedulerConfig(),
        "trainer": TrainerConfig(),
        "train": TrainConfig(),
        "wandb": WandbConfig(),
        "parallel": ParallelConfig(),
        "layer_parallel": MGRITConfig(),
    }
    top = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name in ("seed", "run_dir", "name")}
    return {**{k: _plain(dataclasses.asdict(v)) for k, v in sections.items()}, **top}


def _plain(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}  # OmegaConf has no tuples


def register_hydra_defaults() -> None:
    """Store ``hydra_defaults()`` in Hydra's ConfigStore; call before Hydra composes conf/ (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=DEFAULTS_NAME, node=hydra_defaults())


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The Hydra config ``launch/train.py <overrides>`` would run (a DictConfig, unresolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_hydra_defaults()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
