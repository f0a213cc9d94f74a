"""Single-process checks of tpblocks.parallel: degree validation, KV-head placement, sharding bookkeeping."""

from __future__ import annotations

import pytest
import torch

from tpblocks.models.comm import LocalComm
from tpblocks.models.flavors import get_flavor
from tpblocks.models.model import build_model
from tpblocks.parallel import ParallelDims, check_lane_degree, kv_heads_for_rank, shard_model
from tpblocks.parallel.dist import init_distributed


# ---------------------------------------------------------------------------------------------- ParallelDims
def test_dims_infer_dp_and_coordinates():
    dims = ParallelDims(dp=-1, lane=2, world_size=8)
    assert (dims.dp, dims.lane) == (4, 2)
    # lane is the inner axis: ranks of one lane group are consecutive
    assert dims.coords(5) == (2, 1)
    assert [dims.coords(r) for r in (2, 3)] == [(1, 0), (1, 1)]  # the lane group of dp replica 1
    assert dims.lane_enabled and dims.dp_enabled


def test_dims_default_world_is_one_process():
    dims = ParallelDims()
    assert (dims.dp, dims.lane, dims.world_size) == (1, 1, 1)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"dp": 2, "lane": 2, "world_size": 2}, "dp=2 x lane=2 = 4 ranks, but world_size=2"),
        ({"dp": -1, "lane": 3, "world_size": 4}, "world_size=4 is not a multiple of the lane degree 3"),
        ({"dp": 1, "lane": 0, "world_size": 1}, "lane=0 must be >= 1"),
        ({"dp": 0, "lane": 1, "world_size": 1}, "dp=0 must be >= 1"),
    ],
)
def test_dims_errors_name_the_fix(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ParallelDims(**kwargs)


def test_build_mesh_without_process_group_is_actionable():
    with pytest.raises(RuntimeError, match="init_distributed"):
        ParallelDims(world_size=1).build_mesh("cpu")


def test_lane_degree_must_divide_lane_count():
    cfg = get_flavor("debug_burger", lane_count=6, hidden_size=96, n_heads=4)
    with pytest.raises(ValueError, match="lane_count=6 is not a multiple of the lane degree 4"):
        ParallelDims(lane=4, world_size=4).check_model(cfg)
    ParallelDims(lane=3, world_size=3).check_model(cfg.replace(n_classic_layers=0))  # 2 lanes per rank is fine


def test_lane_degree_must_divide_classic_heads_and_ffn():
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of the lane degree 8"):
        check_lane_degree(get_flavor("debug_llama"), 8)
    with pytest.raises(ValueError, match="classic FFN size 129 is not a multiple of the lane degree 2"):
        check_lane_degree(get_flavor("debug_llama", ffn_hidden_size=129), 2)
    # no classic layers: only the lane count matters
    check_lane_degree(get_flavor("debug_sandwich", n_classic_layers=0, n_heads=1, n_kv_heads=1), 4)


# ---------------------------------------------------------------------------------------------- KV placement
def _q_to_kv(n: int, k: int) -> list[int]:
    return [i // (n // k) for i in range(n)]


@pytest.mark.parametrize("n, k, world", [(8, 8, 2), (8, 2, 2), (8, 2, 4), (8, 1, 4), (8, 2, 8), (6, 3, 2), (12, 3, 2)])
def test_kv_heads_for_rank_keeps_gqa_grouping_exact(n, k, world):
    """Every local query head must meet its own global KV head under SDPA's local j // (n_l / k_l) rule."""
    full = _q_to_kv(n, k)
    n_local = n // world
    for rank in range(world):
        kv = kv_heads_for_rank(n, k, rank, world)
        assert n_local % len(kv) == 0
        per = n_local // len(kv)
        for j in range(n_local):
            assert kv[j // per] == full[rank * n_local + j]
        if k % world == 0:  # divisible: a clean split, k/G heads per rank, no head on two ranks
            assert kv == list(range(rank * k // world, (rank + 1) * k // world))
        elif world % k == 0:  # fewer KV heads than ranks: Table 2's ceiling, one replicated head
            assert len(kv) == 1


# ---------------------------------------------------------------------------------------------- sharding, 1 rank
def test_shard_model_on_one_rank_is_identity():
    cfg = get_flavor("debug_burger")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 7))
    before = model(tokens)
    n_before = model.num_parameters()
    comm = LocalComm()
    shard_model(model, comm)
    assert model.comm is comm and model.shard_spec == {}
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
    assert model.num_parameters() == n_before
    with pytest.raises(ValueError, match="already sharded"):
        shard_model(model, comm)


def test_init_distributed_without_launcher_is_single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed() == (0, 1)


def test_init_distributed_reports_missing_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        init_distributed()


def test_selfcheck_refuses_one_process(monkeypatch, capsys):
    from tpblocks.parallel import selfcheck

    for name in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert selfcheck.main(["--flavor", "debug_llama"]) == 2
    assert "nproc_per_node" in capsys.readouterr().err


def test_dims_are_the_layout_the_data_loader_reads():
    """mode and data coordinates: every rank a replica, lane groups reading one batch each, MGRIT one batch."""
    ddp, lane, mgrit = (
        ParallelDims(dp=-1, lane=1, world_size=4),
        ParallelDims(dp=-1, lane=2, world_size=4),
        ParallelDims(layer_parallel=True, world_size=4),
    )
    assert (ddp.mode, lane.mode, mgrit.mode) == ("ddp", "lane", "mgrit")
    assert [ddp.data_rank(r) for r in range(4)] == [0, 1, 2, 3] and ddp.data_world == 4
    assert [lane.data_rank(r) for r in range(4)] == [0, 0, 1, 1] and lane.data_world == 2
    assert [mgrit.data_rank(r) for r in range(4)] == [0, 0, 0, 0] and mgrit.data_world == 1
    with pytest.raises(ValueError, match=r"layer_parallel runs replicated weights on all 4 ranks: dp=1 and lane=2"):
        ParallelDims(lane=2, layer_parallel=True, world_size=4)
