"""Distributed placement: data-parallel x lane-parallel mesh, a torch.distributed communicator, sharding.

    dims = ParallelDims(dp=-1, lane=2)            # validated against the world size
    mesh = dims.build_mesh("cpu")                 # DeviceMesh, dims ("dp", "lane")
    comm = MeshComm(mesh)                         # collectives over the lane group
    model = shard_model(build_model(cfg), comm)   # this rank's lanes / Megatron shards; model.comm = comm

The model code (``tpblocks.models``) never imports torch.distributed: everything here is applied from outside.
"""

from .audit import CollectiveAudit, expected_syncs_per_token
from .comm import MeshComm
from .dims import ParallelDims, check_lane_degree
from .dist import all_reduce_gradients, destroy_distributed, init_distributed, local_device
from .parallelize import Parallelized, parallel_dims, parallelize
from .placement import clip_grad_norm_, kv_heads_for_rank, local_slice, unshard_state_dict
from .sharding import shard_model
from .vocab_parallel import vocab_parallel_cross_entropy

__all__ = [
    "CollectiveAudit",
    "MeshComm",
    "ParallelDims",
    "Parallelized",
    "all_reduce_gradients",
    "check_lane_degree",
    "clip_grad_norm_",
    "destroy_distributed",
    "expected_syncs_per_token",
    "init_distributed",
    "kv_heads_for_rank",
    "local_device",
    "local_slice",
    "parallel_dims",
    "parallelize",
    "shard_model",
    "unshard_state_dict",
    "vocab_parallel_cross_entropy",
]
