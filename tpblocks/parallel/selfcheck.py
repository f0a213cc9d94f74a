"""Check lane-parallel placement on the machine at hand: sharded forward = single-process forward, syncs/token.

    torchrun --standalone --nproc_per_node=2 -m tpblocks.parallel.selfcheck --flavor debug_burger --lane 2

Every rank builds the same full model (fixed seed), runs it alone as the reference, shards a copy over the
lane group and compares logits for a prefill and a few KV-cache decode steps. Rank 0 prints one line per rank and
exits non-zero on a mismatch, so a new cluster (or a new backend) can be validated before a long run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from ..models.flavors import get_flavor
from ..models.model import build_model
from .audit import CollectiveAudit, expected_syncs_per_token
from .comm import MeshComm
from .dims import ParallelDims
from .dist import destroy_distributed, init_distributed, local_device
from .sharding import shard_model


def run(flavor: str, lane: int | None, steps: int, tol: float) -> dict:
    rank, world = init_distributed()
    if world == 1:
        raise ValueError("selfcheck needs several ranks: torchrun --standalone --nproc_per_node=2 -m ...")
    try:
        report = _compare(rank, world, flavor, lane, steps, tol)
        # Rank 0 prints every rank's line: lines written by several processes to one pipe can interleave.
        reports = [None] * world
        torch.distributed.all_gather_object(reports, report)
        if rank == 0:
            for line in reports:
                print(json.dumps(line), flush=True)
        return report
    finally:
        destroy_distributed()


def _compare(rank: int, world: int, flavor: str, lane: int | None, steps: int, tol: float) -> dict:
    device = local_device()
    cfg = get_flavor(flavor)
    dims = ParallelDims(dp=-1, lane=lane or world)
    dims.check_model(cfg)
    comm = MeshComm(dims.build_mesh(device.type))
    torch.manual_seed(0)
    full = build_model(cfg).to(device).eval()
    model = shard_model(copy.deepcopy(full), comm)
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1)).to(device)
    counted: list[tuple[int, int]] = []  # (comm.counter blocking, blocking collectives seen by torch.distributed)
    with torch.no_grad():
        ref_cache, cache = full.new_cache(8 + steps), model.new_cache(8 + steps)
        worst = (model(prompt, cache) - full(prompt, ref_cache)).abs().max().item()
        nxt = prompt[:, -1:]
        for _ in range(steps):
            comm.counter.reset()
            with CollectiveAudit() as audit:
                got = model(nxt, cache)
            want = full(nxt, ref_cache)
            counted.append((comm.counter.blocking, audit.total - audit.async_ops))
            worst = max(worst, (got - want).abs().max().item())
            nxt = want[:, -1:].argmax(-1)
    expected = expected_syncs_per_token(cfg)
    on_wire = expected if dims.lane > 1 else 0  # a lane group of one rank keeps every call local
    return {
        "rank": rank,
        "world": world,
        "dp": dims.dp,
        "lane": dims.lane,
        "flavor": flavor,
        "max_abs_diff": worst,
        "syncs_per_token": counted[-1][0] if counted else None,
        "collectives_per_token": counted[-1][1] if counted else None,
        "expected_syncs_per_token": expected,
        "ok": worst <= tol and all(c == expected and a == on_wire for c, a in counted),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="debug_burger", help="a name from tpblocks.models.flavors")
    parser.add_argument("--lane", type=int, default=None, help="lane degree (default: every rank in one lane group)")
    parser.add_argument("--steps", type=int, default=3, help="KV-cache decode steps to compare")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed |logit difference|")
    args = parser.parse_args(argv)
    try:
        report = run(args.flavor, args.lane, args.steps, args.tol)
    except ValueError as err:  # bad degrees / flavor: one actionable line, no stack trace
        print(f"selfcheck: {err}", file=sys.stderr)
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
