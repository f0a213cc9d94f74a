"""Measured 2-rank decode latency of Layer Parallelism against 2-way tensor parallelism (gloo, one host).

Each of 2 spawned processes loads the same checkpoint, then times a greedy KV-cache decode for
  TP      every layer Megatron-sharded (``tpblocks.parallel.shard_model``): 2 all-reduces per layer
  LP[a,b) pairs in [a, b) whole on one rank each, one all-reduce per pair, TP elsewhere
(``distribute_layer_pairs``), in interleaved rounds; the slower rank's median step time is reported.
On a shared CPU host the figures mostly measure the all-reduce count (gloo latency dominates a tiny model);
on GPUs they would also show the halved per-rank compute of the pairs.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
from datetime import timedelta

import torch


def _worker(rank: int, world: int, init_file: str, checkpoint: str, ranges, prompt, new_tokens, rounds, out_file):
    import torch.distributed as dist

    from tpblocks.parallel import MeshComm, shard_model

    from .checkpoint import load_llama_family
    from .eval import measure_decode
    from .layer_pairs import LayerPairConfig, distribute_layer_pairs

    torch.set_num_threads(1)  # two ranks share the host's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
    try:
        full = load_llama_family(checkpoint)
        comm = MeshComm()
        candidates = {"TP": shard_model(copy.deepcopy(full), comm)}
        for s, e in ranges:
            cfg = LayerPairConfig(start=s, end=e)
            candidates[cfg.name] = distribute_layer_pairs(full, cfg, comm)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        syncs: dict[str, float] = {}
        # Interleaved rounds: load from other processes on the host hits every schedule alike.
        for _ in range(rounds):
            for name, model in candidates.items():
                comm.counter.reset()
                dist.barrier()
                res = measure_decode(model, prompt, new_tokens=new_tokens, warmup=2)
                times[name].append(res.ms_per_token)
                syncs[name] = res.syncs_per_token
        rows = []
        for name in candidates:
            # A group step ends when its slowest rank does: report the larger of the two ranks' medians.
            t = torch.tensor([statistics.median(times[name])])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rows.append({"row": name, "ms_per_token_2rank": float(t), "syncs_per_token": syncs[name]})
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure_lp_latency(
    checkpoint: str | os.PathLike, ranges, prompt: list[int], new_tokens: int = 32, rounds: int = 3
) -> list[dict]:
    """Spawn 2 gloo ranks; decode ms/token and syncs/token for TP and each LP range (rank 0's figures)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        rdzv, ranges = os.path.join(tmp, "rdzv"), [tuple(r) for r in ranges]
        args = (2, rdzv, str(checkpoint), ranges, list(prompt), new_tokens, rounds, out_file)
        mp.spawn(_worker, args=args, nprocs=2, join=True)
        with open(out_file) as f:
            return json.load(f)


__all__ = ["measure_lp_latency"]
