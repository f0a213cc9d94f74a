"""Every communication schedule on 2 gloo ranks equals its single-process model, with the syncs its formula says.

Schedules: PaLM parallel layers (Megatron shards, 1 blocking all-reduce per layer), Ladder residual (2 async
all-reduces per layer, each awaited one sub-layer later), Kraken (lanes split over the ranks, L-1 async lane sums
+ 1 gather), Parallel Track (lanes split, 1 blocking reduce per block), and for each the no-communication
ceiling (``comm.enabled = False``).

Every rank builds the same full model (same seed), runs it in one process as the reference, then shards a copy
with ``shard_model`` and runs it over the lane group. Checked per case:

* logits equal to fp32 tolerance; every local gradient equals its slice of the full gradient; replicated
  parameters get identical gradients on both ranks; the global gradient norm and the gathered weights are the
  single-process ones;
* syncs per decode token (and per forward) by kind (blocking / overlapped) equal each schedule's formula, written
  out here independently, through ``comm.counter`` *and* through ``CollectiveAudit`` (what reaches
  ``torch.distributed``; overlapped syncs must be ``async_op=True`` calls); ``perfmodel`` predicts the same counts;
* the ceiling issues zero collectives, forward and backward, and its output differs from the synchronised one.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import check_sharded_parity, run_workers

from tpblocks.infer import perfmodel as pm
from tpblocks.models.flavors import get_flavor
from tpblocks.models.model import build_model
from tpblocks.models.schedules import KrakenBlock
from tpblocks.models.tp_block import TPBlock
from tpblocks.parallel import MeshComm, ParallelDims, shard_model

pytestmark = pytest.mark.distributed

# label -> (flavor, overrides, blocking syncs per token, overlapped syncs per token), formulas written out here.
CASES = {
    "palm": ("debug_palm", {}, lambda c: c.n_layers, lambda c: 0),
    "palm_kv_replicated": ("debug_palm", {"n_kv_heads": 1}, lambda c: c.n_layers, lambda c: 0),
    "ladder": ("debug_ladder", {}, lambda c: 0, lambda c: 2 * c.n_layers),
    "kraken": ("debug_kraken", {"n_layers": 3}, lambda c: 1, lambda c: c.n_layers - 1),
    "kraken_4lanes": ("debug_kraken", {"lane_count": 4, "lane_n_heads": 2, "lane_ffn_factor": 0.5},
                      lambda c: 1, lambda c: c.n_layers - 1),  # fmt: skip
    "track": ("debug_track", {}, lambda c: c.tp_block_repetition, lambda c: 0),
    "track_4lanes_mixed": ("debug_track", {"lane_count": 4, "n_classic_layers": 1},
                           lambda c: c.tp_block_repetition * (1 + 2 * c.n_classic_layers), lambda c: 0),  # fmt: skip
}


def _check_case(rank: int, label: str, comm: MeshComm) -> None:
    flavor, overrides, blocking_rule, overlapped_rule = CASES[label]
    cfg = get_flavor(flavor, **overrides)
    blocking, overlapped = blocking_rule(cfg), overlapped_rule(cfg)
    assert (pm.syncs_for_config(cfg), pm.overlapped_syncs_for_config(cfg)) == (blocking, overlapped), label
    torch.manual_seed(1234)
    full = build_model(cfg)

    def halves(model) -> None:
        lane_stages = [s for s in model.stages if isinstance(s, (TPBlock, KrakenBlock))]
        for stage in lane_stages:
            assert stage.layers[0].lanes == cfg.lane_count // 2, f"{label}: each rank must keep half of the lanes"
            assert all(layer.lane_offset == rank * cfg.lane_count // 2 for layer in stage.layers)

    check_sharded_parity(label, full, comm, blocking=blocking, overlapped=overlapped, seq_len=9, prompt_len=5,
                         check_shards=halves)  # fmt: skip


def _worker(rank: int, world: int, labels: list[str]) -> None:
    comm = MeshComm(ParallelDims(dp=1, lane=world).build_mesh("cpu"))
    for label in labels:
        comm.counter.reset()
        _check_case(rank, label, comm)
    _check_bad_degree()


def _check_bad_degree() -> None:
    """A schedule that cannot be split over the lane group fails before any weight is touched."""
    comm = MeshComm()
    for cfg, needle in (
        (get_flavor("debug_kraken", lane_count=3, lane_n_heads=2), "lane_count=3"),
        (get_flavor("debug_palm", hidden_size=48, n_heads=3, n_kv_heads=1), "n_heads=3"),
    ):
        with pytest.raises(ValueError, match=needle):
            shard_model(build_model(cfg), comm)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_every_schedule_equals_single_process():
    run_workers(_worker, world=2, args=(list(CASES),))
