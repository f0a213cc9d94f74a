"""Placement: cut a full single-process model into this rank's share of a lane group (report Fig. 10, Table 2).

The primitives of ``shard_model(model, comm)`` (``tpblocks/parallel/sharding.py``, which walks the stages and
calls these, and ``schedule_placement.py``'s for the other schedules), from outside the pure model code:

* TP blocks: the rank keeps lanes ``[r * L/G, (r + 1) * L/G)`` of every block, still stacked on the lane axis
  (one bmm per sub-layer), and sets ``lane_offset`` on the block, its lane layers (Burger's own-slice write)
  and slices the delayed-communication reception gates. No sync inside a lane: the block's merge
  (``lane_gather``) and the delayed sums are the only collectives.
* Classic decoder layers (the Llama baseline and block mixing): Megatron tensor parallelism. ``wq``/``wk``/
  ``wv``/``w_gate``/``w_up`` are column-split (by heads), ``wo``/``w_down`` row-split; their partial outputs are
  summed by the layer's two ``comm.tp_reduce`` calls. KV heads are split when ``n_kv_heads`` is a multiple of
  G and otherwise replicated: each rank keeps the KV heads its query heads use (Table 2's ceil(n_kv / G)).
  Replicated KV weights get a gradient hook that sums their gradient over the lane group (each rank only
  back-propagated through its own query heads).
* Embedding and final norm stay replicated. The head too, unless ``vocab_parallel_head=True``: then each rank
  keeps vocabulary rows ``[r * V/G, (r + 1) * V/G)`` of the output projection (Megatron's vocab-parallel head)
  and reads 1/G of its bytes per token; the model gathers the logits (``comm.vocab_gather``) unless the caller
  picks tokens from the shards (``tpblocks.infer.engine.vocab_parallel_sample``) or computes the loss on them
  (``vocab_parallel_cross_entropy``). A tied embedding keeps its full weight (one row is read per token) and the
  head becomes its own slice of it.
* Backward: ``comm.tp_enter`` (identity forward, all-reduce backward) is attached as a forward pre-hook to every
  TP block and to the attention / FFN of every classic layer: their input is replicated but each rank only
  back-propagates its own lanes / shards through it.

Every sharded parameter records where it came from in ``model.shard_spec[name] = (dim, index)`` (indices into
the full tensor along ``dim``), which tests use to compare gradients and ``unshard_state_dict`` uses to gather
a full checkpoint back.

Then, for training (``shard_model(lane_dtensors=True)``, ``as_lane_dtensors_``), every parameter that is an even,
in-order shard becomes a DTensor on the lane mesh, ``Shard(dim)``, and every replicated one ``Replicate()``;
the model computes on their local tensors (``tpblocks.models.layers.local``). Replicated KV rows and lane-shared
norms stay plain local tensors with their gradient hooks. ``clip_grad_norm_`` sums squares of every gradient's local
part by the same rules for DTensors and plain ones (torch's ``get_total_norm`` would not do the same: it accumulates
in fp32 and cannot count a replicated KV head once).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..models.comm import Communicator
from ..models.layers import Attention, DecoderLayer, FeedForward
from ..models.model import TransformerLM
from ..models.tp_block import TPBlock

ShardSpec = dict[str, tuple[int, torch.Tensor]]
Copies = dict[str, torch.Tensor]  # name -> how many copies of each local index exist in the lane group


def _take(param: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    """A new parameter holding ``param[index]`` along ``dim`` (its own storage, so the full tensor can go)."""
    taken = param.detach().index_select(dim, index.to(param.device)).clone()
    return nn.Parameter(taken, requires_grad=param.requires_grad)


def _lane_index(lane_count: int, rank: int, world: int) -> torch.Tensor:
    per_rank = lane_count // world
    return torch.arange(rank * per_rank, (rank + 1) * per_rank)


def kv_heads_for_rank(n_heads: int, n_kv_heads: int, rank: int, world: int) -> list[int]:
    """Global KV-head index of every local KV head of ``rank``, chosen so local GQA grouping stays exact.

    Query head i uses KV head ``i // (n_heads // n_kv_heads)``. A rank holds query heads
    ``[r * n/G, (r + 1) * n/G)``; it keeps the distinct KV heads they use (``ceil(n_kv/G)`` of them when the
    grouping lines up). If the local grouping would not map local query j to the right local KV head with
    SDPA's ``j // (n_local / k_local)`` rule, one KV head copy per local query head is kept instead.
    """
    group = n_heads // n_kv_heads
    n_local = n_heads // world
    q_heads = range(rank * n_local, (rank + 1) * n_local)
    needed = sorted({i // group for i in q_heads})
    k_local = len(needed)
    if n_local % k_local == 0:
        per = n_local // k_local
        if all(needed[j // per] == i // group for j, i in enumerate(q_heads)):
            return needed
    return [i // group for i in q_heads]


def _head_rows(heads: list[int] | torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = torch.as_tensor(heads)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _live_comm(model_ref: weakref.ref):
    """The model's communicator when its calls really cross processes, else None (one rank, or the
    no-communication ceiling): what every gradient hook below checks first."""
    model = model_ref()
    comm = model.comm if model is not None else None
    return comm if getattr(comm, "distributed", False) else None


def _all_reduce_rows_hook(model_ref: weakref.ref, rows: torch.Tensor, full_rows: int):
    """Gradient hook for a replicated-KV weight (out rows = ``rows`` of a ``full_rows`` matrix): sum over ranks."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        comm = _live_comm(model_ref)
        if comm is None:
            return grad
        index = rows.to(grad.device)
        full = grad.new_zeros(full_rows, grad.shape[1])
        full.index_add_(0, index, grad)
        comm.backward_counter.add("kv_replica_grad", blocking=True)
        dist.all_reduce(full, group=comm.group)
        return full.index_select(0, index)

    return hook


def _lane_grad_hook(model_ref: weakref.ref, name: str, param: torch.Tensor, hook) -> None:
    """Register ``hook`` on ``param`` and record it in ``model.lane_grad_hooks[name]``: a data-parallel wrapper
    that replaces the parameter objects (FSDP2's ``fully_shard``, which drops their hooks) applies the recorded
    hook to the dp-reduced gradient instead (``tpblocks.parallel.parallelize``)."""
    param.register_hook(hook)
    model_ref().lane_grad_hooks[name] = hook


# ---------------------------------------------------------------------------------------------- sharding
def _sum_grad_hook(model_ref: weakref.ref, kind: str):
    """Gradient hook for a parameter every lane shares but each rank uses only for its own lanes: sum over ranks."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        comm = _live_comm(model_ref)
        if comm is None:
            return grad
        comm.backward_counter.add(kind, blocking=True)
        grad = grad.clone()
        dist.all_reduce(grad, group=comm.group)
        return grad

    return hook


def _shard_lanes(
    block: nn.Module, prefix: str, rank: int, world: int, spec: ShardSpec, model_ref: weakref.ref | None = None
) -> torch.Tensor:
    """Keep this rank's lanes of every ``LaneLayer`` in ``block.layers`` (a TP, Kraken or DTP block); the lane index.

    Lane-stacked parameters have the lane axis first. A 1-D parameter (a norm weight shared by all lanes, DTP) stays
    whole; its gradient is summed over the lane group (each rank back-propagates only its lanes through it).
    """
    index = _lane_index(block.lane_count, rank, world)
    offset = int(index[0])
    block.lane_offset = offset
    for i, layer in enumerate(block.layers):
        layer.lane_offset, layer.n_lanes = offset, len(index)
        for name, param in list(layer.named_parameters(recurse=False)):
            if param.dim() == 1:
                if model_ref is None:
                    raise TypeError(f"{prefix}.layers.{i}.{name} is shared by the lanes: pass model_ref")
                hook = _sum_grad_hook(model_ref, "shared_norm_grad")
                _lane_grad_hook(model_ref, f"{prefix}.layers.{i}.{name}", param, hook)
                continue
            setattr(layer, name, _take(param, 0, index))
            spec[f"{prefix}.layers.{i}.{name}"] = (0, index)
    return index


def _shard_tp_block(block: TPBlock, prefix: str, rank: int, world: int, spec: ShardSpec) -> None:
    index = _shard_lanes(block, prefix, rank, world, spec)
    if block.reception is not None and block.reception.gate is not None:
        block.reception.gate = _take(block.reception.gate, 1, index)
        spec[f"{prefix}.reception.gate"] = (1, index)


def _set_linear(linear: nn.Linear, dim: int, index: torch.Tensor) -> None:
    linear.weight = _take(linear.weight, dim, index)
    linear.out_features, linear.in_features = linear.weight.shape


def _shard_classic(
    layer: DecoderLayer, prefix: str, comm: Communicator, spec: ShardSpec, copies: Copies, model_ref
) -> None:
    rank, world = comm.tp_rank, comm.tp_world
    attn: Attention = layer.attn
    e = attn.head_dim
    n, k = attn.n_heads, attn.n_kv_heads
    n_local = n // world
    q_rows = _head_rows(list(range(rank * n_local, (rank + 1) * n_local)), e)
    kv_heads = kv_heads_for_rank(n, k, rank, world)
    kv_rows = _head_rows(kv_heads, e)
    # Replicated KV heads: count every copy in the group so a global gradient norm counts each head once.
    held = torch.bincount(torch.tensor([h for r in range(world) for h in kv_heads_for_rank(n, k, r, world)]), None, k)
    kv_copies = held[torch.as_tensor(kv_heads)].repeat_interleave(e)
    for name, dim, index in (
        ("wq", 0, q_rows),
        ("wk", 0, kv_rows),
        ("wv", 0, kv_rows),
        ("wo", 1, q_rows),
    ):
        _set_linear(getattr(attn, name), dim, index)
        spec[f"{prefix}.attn.{name}.weight"] = (dim, index)
    attn.n_heads, attn.n_kv_heads = n_local, len(kv_heads)
    if k % world != 0:  # replicated KV heads: their gradient is split over the ranks that share them
        for name in ("wk", "wv"):
            copies[f"{prefix}.attn.{name}.weight"] = kv_copies
            hook = _all_reduce_rows_hook(model_ref, kv_rows, k * e)
            _lane_grad_hook(model_ref, f"{prefix}.attn.{name}.weight", getattr(attn, name).weight, hook)
    ffn: FeedForward = layer.ffn
    f_local = ffn.w_gate.out_features // world
    f_rows = torch.arange(rank * f_local, (rank + 1) * f_local)
    for name, dim in (("w_gate", 0), ("w_up", 0), ("w_down", 1)):
        _set_linear(getattr(ffn, name), dim, f_rows)
        spec[f"{prefix}.ffn.{name}.weight"] = (dim, f_rows)


def _tp_enter_hook(model_ref: weakref.ref):
    """Forward pre-hook applying ``comm.tp_enter`` (f) to the first positional input of a module."""

    def hook(module: nn.Module, args: tuple):
        model = model_ref()
        enter = getattr(model.comm, "tp_enter", None) if model is not None else None
        if enter is None or not args:
            return None
        return (enter(args[0]), *args[1:])

    return hook


# ---------------------------------------------------------------------------------------------- DTensor parameters
def is_even_chunk(index: torch.Tensor, n: int, rank: int) -> bool:
    """True when ``index`` (a shard's rows of the full tensor, ``shard_spec``) is rank ``rank``'s even, in-order
    chunk of ``n`` rows: rows ``[r n, (r + 1) n)``, what ``Shard(dim)`` means."""
    return torch.equal(index.cpu(), torch.arange(rank * n, (rank + 1) * n))


def _lane_placement(name: str, param: torch.Tensor, model: TransformerLM, rank: int):
    """DTensor placement of parameter ``name`` on the lane mesh, or None to keep it a plain local tensor.

    Plain stay the parameters that are no even shard of one full tensor and carry their own gradient hook
    (``model.lane_grad_hooks``): replicated KV heads (``model.shard_copies``, several ranks hold the same rows)
    and the norms every lane shares, whose local gradient is a partial sum the hook adds up over the lane group.
    """
    if name in model.lane_grad_hooks or name in model.shard_copies:
        return None
    if name not in model.shard_spec:
        return Replicate()
    dim, index = model.shard_spec[name]
    return Shard(dim) if is_even_chunk(index, param.shape[dim], rank) else None


def as_lane_dtensors_(model: TransformerLM, comm) -> None:
    """Make every parameter of a sharded model a DTensor on the lane mesh where it is one (``_lane_placement``):
    lane-stacked weights ``Shard(0)``, gates ``Shard(1)``, column-parallel ``Shard(0)``, row-parallel ``Shard(1)``,
    the vocabulary-parallel head ``Shard(0)``, replicated ones ``Replicate()``. Same storage; the model computes
    on ``to_local()`` (``tpblocks.models.layers.local``). Tied parameters stay tied (one DTensor for both)."""
    made: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters():
        placement = _lane_placement(name, param, model, comm.lane_rank)
        if placement is not None:
            shard = DTensor.from_local(param.detach(), comm.mesh, [placement], run_check=False)
            made[id(param)] = nn.Parameter(shard, requires_grad=param.requires_grad)
    _swap_parameters_(model, made)


@torch.no_grad()
def local_parameters_(model: nn.Module) -> nn.Module:
    """Swap every DTensor parameter of ``model`` for a plain one holding its local tensor (same storage, no grad):
    what a compiled, frozen decode graph must see. The model is then for inference only. Returns it."""
    shards = [p for p in model.parameters() if isinstance(p, DTensor)]
    _swap_parameters_(model, {id(p): nn.Parameter(p.to_local(), requires_grad=False) for p in shards})
    return model


def _swap_parameters_(model: nn.Module, made: dict[int, nn.Parameter]) -> None:
    """Put ``made[id(p)]`` in place of every registration of parameter ``p`` (tied ones stay tied)."""
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in made:
                module._parameters[key] = made[id(param)]


# ---------------------------------------------------------------------------------------------- gathering
@torch.no_grad()
def unshard_state_dict(model: TransformerLM) -> dict[str, torch.Tensor]:
    """The full (single-process) state dict of a sharded model, on every rank (collective over the lane group).

    Replicated parameters are taken as they are; sharded ones are all-gathered and put back at their indices.
    """
    spec: ShardSpec | None = getattr(model, "shard_spec", None)
    if spec is None:
        raise ValueError("unshard_state_dict needs a model returned by shard_model")
    comm = model.comm
    state = model.state_dict()
    if not spec:
        return {k: v.clone() for k, v in state.items()}
    full: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if isinstance(tensor, DTensor):
            full[name] = tensor.full_tensor().clone()  # a Replicate one would share the parameter's storage
        elif name not in spec:
            full[name] = tensor.clone()
        else:  # a plain shard (replicated KV heads): gathered by its index
            full[name] = gather_full(tensor, *spec[name], comm.group)
    return full


@torch.no_grad()
def gather_full(local: torch.Tensor, dim: int, index: torch.Tensor, group) -> torch.Tensor:
    """The full tensor from every rank's ``local`` slice: each rank's rows put back at its ``index`` along ``dim``
    (collective over ``group``). Rows several ranks hold (replicated KV heads) are written twice, equal values."""
    world = dist.get_world_size(group)
    index = index.to(local.device)
    parts = [torch.empty_like(local) for _ in range(world)]
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    dist.all_gather(indices, index.contiguous(), group=group)
    shape = list(local.shape)
    shape[dim] = int(torch.cat(indices).max()) + 1
    out = local.new_zeros(shape)
    for part, idx in zip(parts, indices):
        out.index_copy_(dim, idx, part)
    return out


@torch.no_grad()
def copy_dp_shard_(dst: DTensor, full: torch.Tensor) -> None:
    """Write into FSDP2's ``dst`` (a dp shard) this rank's part of ``full``, the whole tensor it shards."""
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None)  # local cut, no comm
    dst.to_local().copy_(mine.to_local())


def local_slice(full: torch.Tensor, spec: ShardSpec, name: str) -> torch.Tensor:
    """This rank's share of a full tensor of parameter ``name`` (unchanged if it is replicated)."""
    if name not in spec:
        return full
    dim, index = spec[name]
    return full.index_select(dim, index.to(full.device))


# ---------------------------------------------------------------------------------------------- gradient norm
def _local_rows(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of a gradient and, for an FSDP2 dp shard, the index of its first row.

    A lane DTensor's local part is the lane shard a plain parameter held before. An FSDP2 gradient is
    ``Shard(0)`` over the ``dp`` mesh (``_StridedShard(0)`` beside a lane placement on the (dp, lane) mesh);
    FSDP2 cuts dim 0 as ``torch.chunk`` does (ceil(n / dp) rows a rank, the last ones short or empty). Only a
    plain shard (replicated KV heads) needs the first row, to weigh its rows by ``model.shard_copies``.
    """
    if not isinstance(grad, DTensor):
        return grad, 0
    if grad.device_mesh.mesh_dim_names != ("dp",):
        return grad.to_local(), 0
    per_rank = -(-grad.shape[0] // grad.device_mesh.size())
    return grad.to_local(), min(grad.device_mesh.get_local_rank() * per_rank, grad.shape[0])


@torch.no_grad()
def clip_grad_norm_(model: TransformerLM, max_norm: float | None, dp_group=None) -> float:
    """Global L2 norm of the gradients of a sharded model, the same on every rank; clips when ``max_norm`` is set.

    ``torch.nn.utils.clip_grad_norm_`` on a shard sees only this rank's lanes/shards, so each lane rank would
    clip by a different factor and the replicas would drift apart. Here replicated parameters count once,
    sharded ones are summed over the lane group (each replicated KV head once), in one all-reduce, in float64.
    What counts where is read off ``model.shard_spec`` by name, so a DTensor gradient counts as its plain shard did
    (its local part, ``_local_rows``). Call it after the data-parallel gradient average (dp replicas then hold
    equal gradients). ``dp_group``: the gradients are FSDP2 dp shards; their squares are summed over it first.
    """
    spec: ShardSpec = getattr(model, "shard_spec", None) or {}
    copies: Copies = getattr(model, "shard_copies", None) or {}
    comm = model.comm
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    if not grads:
        return 0.0
    device = next(iter(grads.values())).device
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    for name, g in grads.items():
        g, first_row = _local_rows(g)
        grads[name] = g  # clipped in place below: a DTensor's local part is its storage
        sq = g.detach().double().pow(2)
        if name not in spec:
            replicated += sq.sum()
        elif name in copies:
            dim = spec[name][0]
            per_index = copies[name].to(device=device, dtype=sq.dtype)
            if dim == 0:  # FSDP2 holds rows [first_row, first_row + n) of this lane rank's shard
                per_index = per_index[first_row : first_row + sq.shape[0]]
            shape = [1] * sq.dim()
            shape[dim] = -1
            sharded += (sq / per_index.view(shape)).sum()
        else:
            sharded += sq.sum()
    if dp_group is not None:
        both = torch.stack([replicated, sharded])
        dist.all_reduce(both, group=dp_group)
        replicated, sharded = both[0], both[1]
    if spec and getattr(comm, "distributed", False):
        dist.all_reduce(sharded, group=comm.group)
    total = float((replicated + sharded).sqrt())
    if max_norm is not None and max_norm > 0:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads.values():
                g.mul_(coef)
    return total
