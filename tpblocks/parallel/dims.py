"""Parallel degrees and the named device mesh (data parallel x lane parallel): the one type for a run's layout.

A run on ``world_size`` ranks is a 2-D grid ``(dp, lane)``. The ``lane`` axis is the inner one, so the ranks of
one lane group are consecutive (on one node, behind NVLink on a GPU server): they hold the lanes of every TP
block and, Megatron-style, the shards of every classic layer. The ``lane`` axis is therefore also the
tensor-parallel axis. The ``dp`` axis replicates that group; each dp rank reads different data.
With ``layer_parallel`` the whole world runs one model's layer stack by MGRIT instead (``dp = lane = 1``): every
rank reads the same batch.

Every inconsistency is reported at start-up as a ``ValueError`` that names the field and the fix, e.g.
``"lane_count=6 is not a multiple of the lane degree 4"``, instead of a shape error deep inside a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..models.config import DENSE_ARCHS, ModelConfig


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of parallelism. ``dp=-1`` means "whatever is left": ``world_size // lane``.

    ``world_size`` defaults to the size of the initialised default process group, or 1 without one.
    ``layer_parallel``: the world is one MGRIT group (module doc). ``device_type`` is the mesh's device.
    """

    dp: int = 1
    lane: int = 1
    world_size: int | None = None
    layer_parallel: bool = False
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        world = self.world_size
        if world is None:
            world = _default_world_size()
            object.__setattr__(self, "world_size", world)
        if world < 1:
            raise ValueError(f"world_size={world} must be >= 1")
        if self.lane < 1:
            raise ValueError(f"lane={self.lane} must be >= 1 (1 = every rank holds all lanes)")
        if self.dp == -1:
            if world % self.lane != 0:
                raise ValueError(
                    f"world_size={world} is not a multiple of the lane degree {self.lane}; "
                    f"launch a multiple of {self.lane} ranks or change lane"
                )
            object.__setattr__(self, "dp", world // self.lane)
        if self.dp < 1:
            raise ValueError(f"dp={self.dp} must be >= 1, or -1 to use every rank left after the lane degree")
        if self.layer_parallel:
            if (self.dp, self.lane) != (1, 1):
                raise ValueError(
                    f"layer_parallel runs replicated weights on all {world} ranks: dp={self.dp} and lane={self.lane} "
                    f"must both be 1 (set parallel.lane=1 or layer_parallel.enabled=false)"
                )
        elif self.dp * self.lane != world:
            raise ValueError(
                f"dp={self.dp} x lane={self.lane} = {self.dp * self.lane} ranks, but world_size={world}; "
                f"set dp=-1 to infer it, or launch {self.dp * self.lane} ranks (torchrun --nproc_per_node)"
            )

    # ------------------------------------------------------------------ coordinates
    @property
    def lane_enabled(self) -> bool:
        return self.lane > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def mode(self) -> str:
        """ "mgrit" (layer parallel), "lane" (a (dp, lane) mesh with lane > 1) or "ddp" (every rank a replica)."""
        if self.layer_parallel:
            return "mgrit"
        return "lane" if self.lane_enabled else "ddp"

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, lane_rank) of a global rank: the lane axis varies fastest."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside 0..{self.world_size - 1}")
        if self.layer_parallel:
            return 0, 0
        return divmod(rank, self.lane)

    @property
    def data_world(self) -> int:
        """How many different batches one step reads: the data loader's world (1 under MGRIT)."""
        return self.dp

    def data_rank(self, rank: int) -> int:
        """Which of them ``rank`` reads: its dp coordinate (all lane ranks of a replica read the same batch)."""
        return self.coords(rank)[0]

    # ------------------------------------------------------------------ validation against a model
    def check_model(self, cfg: ModelConfig) -> None:
        """Raise ``ValueError`` if ``cfg`` cannot be placed on ``lane`` ranks (see ``tpblocks.parallel.placement``)."""
        check_lane_degree(cfg, self.lane)

    # ------------------------------------------------------------------ mesh
    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """A ``DeviceMesh`` of shape (dp, lane) with dims named ("dp", "lane"). Needs an initialised process group."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "build_mesh needs torch.distributed initialised; call tpblocks.parallel.init_distributed() first "
                "(under torchrun) or use MeshComm only with world_size=1 models"
            )
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims was built for world_size={self.world_size} but the process group has "
                f"{dist.get_world_size()} ranks; rebuild it with world_size=None"
            )
        return init_device_mesh(device_type, (self.dp, self.lane), mesh_dim_names=("dp", "lane"))

    @cached_property
    def mesh(self) -> DeviceMesh:
        """This run's (dp, lane) mesh on ``device_type``, built on first use (a collective) and then kept: every
        named sub-mesh (``mesh["dp"]``, ``mesh["lane"]``) comes from it."""
        return self.build_mesh(self.device_type)


def check_lane_degree(cfg: ModelConfig, lane: int) -> None:
    """Every constraint that sharding ``cfg`` over ``lane`` ranks imposes, with the fix in the message."""
    if lane == 1:
        return
    # TP blocks (Sandwich / Burger / Track), Kraken and DTP split their lanes over the ranks.
    if cfg.arch in ("tp_blocks", "dtp") and cfg.lane_count % lane != 0:
        raise ValueError(
            f"lane_count={cfg.lane_count} is not a multiple of the lane degree {lane}; every rank must hold the same "
            f"number of lanes (report §4.1: lane_count = G x k). Use lane_count in "
            f"{[lane * k for k in range(1, 5)]} or a lane degree that divides {cfg.lane_count}"
        )
    if cfg.arch == "kraken" and cfg.lane_count % lane != 0:
        raise ValueError(
            f"lane_count={cfg.lane_count} (Kraken's degree G) is not a multiple of the lane degree {lane}; every "
            f"rank must hold the same number of Kraken lanes. Use lane_count in {[lane * k for k in range(1, 5)]}"
        )
    # Llama, PaLM and Ladder layers (and classic layers between TP blocks) take Megatron shards.
    has_classic = cfg.arch in DENSE_ARCHS or cfg.n_classic_layers > 0
    if not has_classic:
        return
    if cfg.n_heads % lane != 0:
        raise ValueError(
            f"n_heads={cfg.n_heads} is not a multiple of the lane degree {lane}: classic layers split their attention "
            f"heads across the lane group (Megatron column split); use n_heads divisible by {lane}"
        )
    if cfg.ffn_hidden % lane != 0:
        raise ValueError(
            f"classic FFN size {cfg.ffn_hidden} is not a multiple of the lane degree {lane}: the FFN is column/row "
            f"split across the lane group; set ffn_hidden_size to a multiple of {lane}"
        )


def check_vocab_parallel_head(cfg: ModelConfig, lane: int) -> None:
    """What splitting the output head by vocabulary rows over ``lane`` ranks needs, with the fix in the message."""
    if cfg.arch == "dtp" and cfg.lm_head_type != "replicate":
        raise ValueError(
            f"vocab_parallel_head: a DTP model's {cfg.lm_head_type!r} head is already cut by lanes; "
            "it applies to lm_head_type='replicate' only"
        )
    if cfg.vocab_size % lane:
        raise ValueError(
            f"vocab_parallel_head: vocab_size={cfg.vocab_size} is not a multiple of the lane degree {lane}; every "
            f"rank holds vocab_size / lane head rows (set vocab_size to a multiple of {lane})"
        )


def _default_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
