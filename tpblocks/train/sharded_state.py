"""Model and optimizer state through ``torch.distributed.checkpoint`` (DCP): sharded, reshardable, async on request.

Every rank hands DCP the same keys, named after the FULL (single-process) model, whatever the layout:

  model.<name>          a parameter or buffer of ``model.state_dict()``
  optim.<name>.<leaf>   its optimizer state (AdamW: ``exp_avg``/``exp_avg_sq`` shaped like the parameter, ``step``)

A lane-sharded tensor (``model.shard_spec[name] = (dim, index)``, tpblocks/parallel/placement.py) goes in as a
DTensor, ``Shard(dim)`` on the ``lane`` axis of the (dp, lane) mesh and ``Replicate()`` on ``dp``: each lane rank
writes its own slice and DCP writes every replicated piece once. A replicated-KV shard (rows that several lane ranks
hold, ``model.shard_copies``) is no even chunk of the full tensor, so it is gathered over the lane group and saved
whole (these are the small K/V projections of GQA layers with fewer KV heads than lane ranks).

Under FSDP2 (``trainer=fsdp``) a parameter is a DTensor, ``Shard(0)`` over the dp mesh: a replicated one goes in as
it is (DCP writes each dp shard once); a lane-sharded one is gathered over dp into this lane rank's shard, which then
goes in as above. So an fsdp checkpoint holds the same keys and full shapes as a ddp one, and either resumes the other.

Loading builds the same keys for *this* run's layout and DCP reads the pieces each target overlaps. So a checkpoint
written with ``parallel.lane=2`` loads with ``lane=1`` on one rank, with dp 2 on two ranks, and back; no rank ever
holds more than its own share (except the gathered replicated-KV tensors).
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from tpblocks.parallel.placement import copy_dp_shard_, gather_full, is_even_chunk, local_slice

MODEL, OPTIM = "model.", "optim."


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _dcp_call(no_dist: bool):
    """DCP warns on every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent")
        yield


def _full_shape(local: torch.Tensor, dim: int, parts: int) -> torch.Size:
    shape = list(local.shape)
    shape[dim] *= parts
    return torch.Size(shape)


def _as_dtensor(local: torch.Tensor, dim: int, index: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """``local`` as the lane rank's even chunk ``Shard(dim)`` of the full tensor (replicated over dp)."""
    rank = mesh["lane"].get_local_rank()
    # Every placement so far (lanes, Megatron heads/rows, vocabulary rows) cuts even chunks in rank order; a new
    # one that does not must be taught here, or its checkpoint would put rows in the wrong place.
    assert is_even_chunk(index, local.shape[dim], rank), "not an even, in-order shard"
    shape = _full_shape(local, dim, mesh["lane"].size())
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Replicate(), Shard(dim)], run_check=False, shape=shape, stride=stride)


def _whole(tensor: torch.Tensor) -> bool:
    """True for a DTensor of the whole tensor on a mesh with a lane dim: ``shard_model``'s lane DTensors and their
    optimizer state, and FSDP2's dp shards of them on the (dp, lane) mesh. DCP reads and writes those as they are
    (any layout can load what they wrote); only plain shards and FSDP2's 1-D dp ones need the map below."""
    return isinstance(tensor, DTensor) and "lane" in (tensor.device_mesh.mesh_dim_names or ())


class ShardMap:
    """How this rank's tensors sit in the full ones: the model's ``shard_spec`` and the (dp, lane) mesh."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh | None):
        self.spec = getattr(model, "shard_spec", None) or {}
        self.copies = getattr(model, "shard_copies", None) or {}
        self.mesh = mesh
        assert not self.spec or mesh is not None, "a sharded model needs its (dp, lane) mesh"

    def to_save(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """What DCP writes for parameter ``name`` (or a tensor shaped like it): whole, a DTensor, or gathered."""
        if name not in self.spec or _whole(local):
            return local
        if isinstance(local, DTensor):  # FSDP2's dp shard of this lane rank's shard
            local = local.full_tensor()
        dim, index = self.spec[name]
        if name in self.copies:
            return gather_full(local, dim, index, self.mesh.get_group("lane"))
        return _as_dtensor(local, dim, index, self.mesh)

    def to_load(self, name: str, local: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
        """The tensor DCP reads into for ``name``: ``local`` itself (its storage, in place) where it can."""
        if name not in self.spec or _whole(local):
            return local
        if name in self.copies:
            return torch.empty(full_shape, dtype=local.dtype, device=local.device)  # ``settle`` copies it in
        if isinstance(local, DTensor):  # FSDP2: read this lane rank's shard whole, ``settle`` keeps the dp part
            local = torch.empty(local.shape, dtype=local.dtype, device=local.device)
        return _as_dtensor(local, *self.spec[name], self.mesh)

    @torch.no_grad()
    def settle(self, name: str, local: torch.Tensor, loaded: torch.Tensor) -> None:
        """After the read: put what ``to_load`` did not read in place into ``local``."""
        if name not in self.spec or _whole(local):
            return
        lane_shard = local_slice(loaded, self.spec, name) if name in self.copies else loaded.to_local()
        if isinstance(local, DTensor):
            copy_dp_shard_(local, lane_shard)
        elif name in self.copies:
            local.copy_(lane_shard)


# ---------------------------------------------------------------------------------------------- state dicts
def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Full-model name of every parameter the optimizer holds, in its order (its state-dict indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _save_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None, shards: ShardMap) -> dict:
    state = {MODEL + k: shards.to_save(k, v.detach()) for k, v in model.state_dict().items()}
    if optimizer is None:
        return state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(_param_names(model, optimizer), params):
        for leaf, value in optimizer.state.get(param, {}).items():
            assert torch.is_tensor(value), f"optimizer state {name}.{leaf} is not a tensor"
            shaped = value.shape == param.shape
            state[f"{OPTIM}{name}.{leaf}"] = shards.to_save(name, value) if shaped else value
    return state


def optimizer_groups(optimizer: torch.optim.Optimizer | None) -> list[dict] | None:
    """The hyperparameters of every param group (the plain, small part of the optimizer state: trainer.pt)."""
    if optimizer is None:
        return None
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]


def save(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    mesh: DeviceMesh | None,
    directory: Path,
    process_group: dist.ProcessGroup | None = None,
    asynchronous: bool = False,
) -> Future | None:
    """Write this rank's share into ``directory`` (collective). ``asynchronous``: stage a copy and write it in a
    background thread over ``process_group`` (one apart from the training collectives); returns its Future."""
    state = _save_dict(model, optimizer, ShardMap(model, mesh))
    no_dist = not _distributed()
    with _dcp_call(no_dist):
        if asynchronous:
            return dcp.async_save(state, checkpoint_id=directory, process_group=process_group, no_dist=no_dist)
        dcp.save(state, checkpoint_id=directory, no_dist=no_dist)
    return None


def _metadata(directory: Path) -> dict:
    try:
        return dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as err:  # a missing or unreadable .metadata: one line naming the checkpoint
        raise ValueError(f"cannot read the sharded checkpoint {directory}: {type(err).__name__}: {err}") from err


def _read(state: dict, directory: Path, no_dist: bool) -> None:
    try:
        with _dcp_call(no_dist):
            dcp.load(state, checkpoint_id=directory, no_dist=no_dist)
    except Exception as err:  # DCP wraps every rank's failure; the first line says what
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"cannot load {directory}: {type(err).__name__}: {first}") from err


def load(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, groups: list[dict] | None, mesh, directory: Path
) -> None:
    """Read ``directory`` into this rank's model (and optimizer, whose param-group hyperparameters are ``groups``)
    in place, whatever layout wrote it (collective)."""
    saved = _metadata(directory)
    shards = ShardMap(model, mesh)
    locals_ = {MODEL + k: (k, v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        locals_.update(_optimizer_locals(model, optimizer, saved, directory))
    missing = sorted(set(locals_) - set(saved))
    if missing:
        raise ValueError(f"{directory} lacks {len(missing)} tensor(s) this run needs, e.g. {missing[:3]}")
    targets = {key: shards.to_load(name, local, saved[key].size) for key, (name, local) in locals_.items()}
    _read(targets, directory, no_dist=not _distributed())
    for key, (name, local) in locals_.items():
        shards.settle(name, local, targets[key])
    if optimizer is not None:
        _load_optimizer(model, optimizer, groups, {k: v[1] for k, v in locals_.items() if k.startswith(OPTIM)})


def _optimizer_locals(model, optimizer, saved: dict, directory: Path) -> dict:
    """``{key: (parameter name, fresh local tensor)}`` for every optimizer state the checkpoint holds: shaped like
    this rank's parameter when it has the parameter's rank (moments), else whole (AdamW's scalar ``step``)."""
    params = dict(model.named_parameters())
    out = {}
    for name in _param_names(model, optimizer):
        prefix = f"{OPTIM}{name}."
        leaves = [k[len(prefix) :] for k in saved if k.startswith(prefix)]
        if not leaves:
            raise ValueError(f"{directory} holds no optimizer state for {name} (written by trainer=deepspeed?)")
        for leaf in leaves:
            full, param = saved[prefix + leaf], params[name]
            like_param = len(full.size) == param.dim()
            local = torch.empty_like(param) if like_param else torch.empty(full.size, dtype=full.properties.dtype)
            out[prefix + leaf] = (name, local) if like_param else (prefix + leaf, local)
    return out


def _implementation(group: dict) -> dict:
    """How a param group steps (not its state): this run's choice, whatever the checkpoint's run chose."""
    return {k: group[k] for k in ("foreach", "fused", "capturable", "differentiable") if k in group}


def _load_optimizer(model, optimizer, groups: list[dict] | None, loaded: dict) -> None:
    current = optimizer.state_dict()["param_groups"]
    if groups is None or len(groups) != len(current):
        raise ValueError(f"the checkpoint's optimizer has {len(groups or [])} param groups, this run {len(current)}")
    state: dict = {}
    for index, name in enumerate(_param_names(model, optimizer)):
        prefix = f"{OPTIM}{name}."
        state[index] = {k[len(prefix) :]: v for k, v in loaded.items() if k.startswith(prefix)}
    # The saved hyperparameters, but this run's choice of implementation: a layout that mixes DTensors and plain
    # tensors cannot take the foreach path another layout saved (tpblocks.train.optim.build_optimizer).
    merged = [{**saved, **_implementation(mine), "params": mine["params"]} for saved, mine in zip(groups, current)]
    optimizer.load_state_dict({"state": state, "param_groups": merged})


def load_full_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, read in this one process (any layout wrote it)."""
    saved = _metadata(directory)
    state = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in saved.items() if k.startswith(MODEL)}
    _read(state, directory, no_dist=True)
    return {k[len(MODEL) :]: v for k, v in state.items()}
