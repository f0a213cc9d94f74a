"""Lane-parallel execution on 2 gloo ranks equals the single-process model (forward, backward, KV-cache decode).

Every rank builds the same full model (same seed), runs it in one process as the reference, then shards a copy
with ``shard_model`` and runs it over the lane group. Checked per model (Llama-TP with split / replicated KV
heads, Sandwich and Burger with delayed communication and block mixing):

* logits equal to fp32 tolerance; every local gradient equals its slice of the full gradient; replicated
  parameters get identical gradients on both ranks;
* blocking syncs per forward and per decode step = TP_block_repetition x (2 n_classic + 1) (TP blocks) or
  2 n_layers (Llama-TP), both through ``comm.counter`` and through an independent count of the
  ``torch.distributed`` calls (``CollectiveAudit``);
* ``comm.enabled = False`` (the no-communication ceiling) runs the sharded model with zero collectives.

A second group checks a data-parallel mesh (dp=2) and, on 4 ranks, the dp x lane grid.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dist_utils import check_grad_norm, check_grad_slices, check_sharded_parity, run_workers

from tpblocks.models.flavors import get_flavor
from tpblocks.models.model import build_model
from tpblocks.models.tp_block import TPBlock
from tpblocks.parallel import MeshComm, ParallelDims, all_reduce_gradients, shard_model

pytestmark = pytest.mark.distributed

CASES = {
    "llama": ("debug_llama", {}),
    "llama_kv_replicated": ("debug_llama", {"n_kv_heads": 1}),  # 1 KV head on 2 ranks: Table 2's ceiling
    "llama_kv_per_query": ("debug_llama", {"hidden_size": 48, "n_heads": 6, "n_kv_heads": 3}),  # 3 KV on 2 ranks
    "sandwich_gated": ("debug_sandwich", {"comm_reception": "gated"}),
    "burger_mean": ("debug_burger", {"comm_reception": "mean"}),
    # two sums in flight at once (sends after layers 0 and 1, received after 2 and 3)
    "burger_overlapping_sends": ("debug_burger", {"lane_depth": 4, "comm_length": 2, "comm_reception": "sum"}),
}


def _expected_syncs(cfg) -> int:
    if cfg.arch == "llama":
        return 2 * cfg.n_layers
    return cfg.tp_block_repetition * (2 * cfg.n_classic_layers + 1)


def _expected_overlapped(cfg) -> int:
    return 0 if cfg.arch == "llama" else cfg.tp_block_repetition * len(cfg.delayed_sends)


def _full_model(cfg):
    torch.manual_seed(1234)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("reception.gate"):  # open the gates so the delayed sums change the output
                p.normal_(0.0, 0.5)
    return model


def _check_case(rank: int, label: str, flavor: str, overrides: dict, comm: MeshComm) -> None:
    cfg = get_flavor(flavor, **overrides)

    def halves(model) -> None:
        lanes_here = [s.lanes for s in model.stages if isinstance(s, TPBlock)]
        assert all(n == cfg.lane_count // 2 for n in lanes_here), f"{label}: each rank must keep half of the lanes"

    blocking, overlapped = _expected_syncs(cfg), _expected_overlapped(cfg)
    check_sharded_parity(label, _full_model(cfg), comm, blocking=blocking, overlapped=overlapped, seq_len=11,
                         prompt_len=6, check_shards=halves)  # fmt: skip


def _two_rank_worker(rank: int, world: int, labels: list[str]) -> None:
    """One spawn for every 2-rank check (process start-up dominates on 2 cores): lane=2 cases, then dp=2."""
    dims = ParallelDims(dp=1, lane=world)
    comm = MeshComm(dims.build_mesh("cpu"))
    assert (comm.lane_rank, comm.lane_world) == (rank, world)
    for label in labels:
        flavor, overrides = CASES[label]
        _check_case(rank, label, flavor, overrides, comm)
    _data_parallel_check(rank, dp=world, lane=1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_lane_parallel_and_data_parallel_equal_single_process():
    run_workers(_two_rank_worker, world=2, args=(list(CASES),))


# ---------------------------------------------------------------------------------------------- data parallel
def _grad_step(model, tokens, targets) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()


def _mesh_worker(rank: int, world: int, dp: int, lane: int) -> None:
    _data_parallel_check(rank, dp, lane)


def _data_parallel_check(rank: int, dp: int, lane: int) -> None:
    """dp x lane grid: each dp replica reads its own half of the batch; averaged gradients = the full batch's."""
    dims = ParallelDims(dp=dp, lane=lane)
    mesh = dims.build_mesh("cpu")
    dp_rank, lane_rank = dims.coords(rank)
    assert (mesh.get_local_rank("dp"), mesh.get_local_rank("lane")) == (dp_rank, lane_rank)
    comm = MeshComm(mesh)
    assert comm.lane_world == lane
    cfg = get_flavor("debug_burger", comm_reception="mean")
    full = _full_model(cfg)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2 * dp, 9), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2 * dp, 9), generator=gen)
    _grad_step(full, tokens, targets)  # whole batch, one process

    model = shard_model(copy.deepcopy(full), comm)
    rows = slice(2 * dp_rank, 2 * dp_rank + 2)
    _grad_step(model, tokens[rows], targets[rows])
    all_reduce_gradients(model, group=mesh.get_group("dp"))
    label = f"dp={dp} lane={lane}"
    check_grad_norm(model, full, label)
    check_grad_slices(model, full, label, strict=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dp_by_lane_mesh_four_ranks():
    run_workers(_mesh_worker, world=4, args=(2, 2))


# ---------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_selfcheck_under_torchrun(tmp_path):
    """The real launcher path: torchrun env -> init_distributed -> ParallelDims(dp=-1) mesh -> shard -> decode."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "tpblocks.parallel.selfcheck", "--flavor", "debug_llama", "--lane", "2", "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=220, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["ok"] and r["lane"] == 2 and r["dp"] == 1
        assert r["syncs_per_token"] == r["collectives_per_token"] == 2 * get_flavor("debug_llama").n_layers
