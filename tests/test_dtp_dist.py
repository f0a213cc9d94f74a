"""Delayed Tensor Parallelism (Laneformer) on 2 gloo ranks equals its single-process model, syncs as the formula.

Every rank builds the same full model (same seed) as the reference, then shards a copy with ``shard_model``
(lanes split over the ranks; shared norms whole, their gradient summed; the head cut by lanes where its type
says so) and runs ``check_sharded_parity``: forward logits, every local gradient against its slice of the full
gradient, the global gradient norm, the gathered weights, KV-cache prefill + decode (sliding-window layers
included), blocking / overlapped syncs through ``comm.counter`` and ``CollectiveAudit``, and the
no-communication ceiling. The counts are written out here from the rules, independently of ``dtp_syncs``.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import check_sharded_parity, run_workers

from tpblocks.infer import perfmodel as pm
from tpblocks.models.flavors import get_flavor
from tpblocks.models.model import build_model
from tpblocks.parallel import MeshComm, ParallelDims, shard_model

pytestmark = pytest.mark.distributed

CASES = {  # label -> overrides of debug_dtp (2 lanes, δ = 1, 4 layers, window 6 on the first 2)
    "default": {},
    "4 lanes on 2 ranks, δ=2 of 5 layers": {"lane_count": 4, "n_kv_heads": 4, "broadcast_delay": 2, "n_layers": 5},
    "no early comm, no resend": {"use_early_comm": False, "early_comm_resend": False},
    "lane head, per-lane norms": {"lm_head_type": "lane", "replicated_rmsn_scale": False},
    "vocab-parallel head": {"lm_head_type": "vocab_parallel"},
    "pre-norm lane aggregation": {"pre_norm_lane_agg": True},
}


def _expected_syncs(cfg) -> tuple[int, int]:
    rules, delay = cfg.dtp_rules, cfg.broadcast_delay
    present = sum(rule == "present" for rule in rules)
    started = sum(rules[i] != "present" for i in range(cfg.n_layers - delay)) if cfg.use_comm else 0
    return 2 * present + 1, 2 * started


def _worker(rank: int, world: int, labels: list[str]) -> None:
    comm = MeshComm(ParallelDims(dp=1, lane=world).build_mesh("cpu"))
    for label in labels:
        cfg = get_flavor("debug_dtp", **CASES[label])
        blocking, overlapped = _expected_syncs(cfg)
        assert (pm.syncs_for_config(cfg), pm.overlapped_syncs_for_config(cfg)) == (blocking, overlapped), label
        torch.manual_seed(1234)
        full = build_model(cfg)
        with torch.no_grad():  # norms start at one: make a wrong lane or a missing gradient sum show
            for name, p in full.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)

        def halves(model, cfg=cfg, label=label) -> None:
            layers = model.stages[0].layers
            assert layers[0].lanes == cfg.lane_count // world, f"{label}: each rank keeps its share of the lanes"
            assert all(layer.lane_offset == rank * cfg.lane_count // world for layer in layers)

        comm.counter.reset()
        check_sharded_parity(label, full, comm, blocking=blocking, overlapped=overlapped, seq_len=9, prompt_len=5,
                             check_shards=halves)  # fmt: skip
    with pytest.raises(ValueError, match="already cut by lanes"):
        shard_model(build_model(get_flavor("debug_dtp", lm_head_type="lane")), comm, vocab_parallel_head=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_dtp_equals_single_process():
    run_workers(_worker, world=2, args=(list(CASES),))


def test_lane_degree_that_does_not_divide_the_lanes_is_refused():
    from tpblocks.parallel.dims import check_lane_degree

    with pytest.raises(ValueError, match="lane_count=2 is not a multiple of the lane degree 4"):
        check_lane_degree(get_flavor("debug_dtp"), 4)
