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

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_workers

from tpblocks.infer import perfmodel as pm
from tpblocks.models.flavors import get_flavor
from tpblocks.models.model import build_model
from tpblocks.models.schedules import KrakenBlock
from tpblocks.models.tp_block import TPBlock
from tpblocks.parallel import (
    CollectiveAudit,
    MeshComm,
    ParallelDims,
    clip_grad_norm_,
    local_slice,
    shard_model,
    unshard_state_dict,
)

pytestmark = pytest.mark.distributed

RTOL, ATOL = 1e-4, 2e-5  # fp32: only the summation order differs between 1 and 2 processes

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


def _full_model(cfg):
    torch.manual_seed(1234)
    return build_model(cfg)


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _check_counts(label: str, comm: MeshComm, audit: CollectiveAudit, blocking: int, overlapped: int) -> None:
    got = comm.counter.snapshot()
    assert comm.counter.blocking == blocking, f"{label}: {got} vs {blocking} blocking"
    assert comm.counter.overlapped == overlapped, f"{label}: {got} vs {overlapped} overlapped"
    assert audit.total == blocking + overlapped, f"{label}: audit {dict(audit.calls)} vs {blocking + overlapped}"
    assert audit.async_ops == overlapped, f"{label}: {audit.async_ops} async collectives, want {overlapped}"


def _check_case(rank: int, label: str, comm: MeshComm) -> None:
    flavor, overrides, blocking_rule, overlapped_rule = CASES[label]
    cfg = get_flavor(flavor, **overrides)
    blocking, overlapped = blocking_rule(cfg), overlapped_rule(cfg)
    assert (pm.syncs_for_config(cfg), pm.overlapped_syncs_for_config(cfg)) == (blocking, overlapped), label
    full = _full_model(cfg)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    ref = full(tokens)
    F.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()

    model = shard_model(copy.deepcopy(full), comm)
    lane_stages = [s for s in model.stages if isinstance(s, (TPBlock, KrakenBlock))]
    for stage in lane_stages:
        assert stage.layers[0].lanes == cfg.lane_count // 2, f"{label}: each rank must keep half of the lanes"
        assert all(layer.lane_offset == rank * cfg.lane_count // 2 for layer in stage.layers)
    assert model.num_parameters() < full.num_parameters(), f"{label}: nothing was sharded"

    # ---- forward, counted twice
    comm.counter.reset()
    with CollectiveAudit() as audit:
        out = model(tokens)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label} forward: {m}")
    _check_counts(label, comm, audit, blocking, overlapped)

    # ---- backward: local gradients are slices of the single-process gradients
    F.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
    full_params = dict(full.named_parameters())
    for name, p in model.named_parameters():
        expected = local_slice(full_params[name].grad, model.shard_spec, name)
        scale = expected.abs().max().item()
        assert scale > 0, f"{label}: {name} got no gradient in the reference; the check would be vacuous"
        where = f"{label} gradient of {name}"
        torch.testing.assert_close(p.grad, expected, rtol=RTOL, atol=ATOL * scale, msg=lambda m, w=where: f"{w}: {m}")
        if name not in model.shard_spec:
            assert _same_on_all_ranks(p.grad), f"{label}: replicated {name} has different grads per rank"
    want = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in full.parameters())).item()
    got = clip_grad_norm_(model, None)
    assert abs(got - want) <= 1e-5 * want, f"{label}: sharded grad norm {got} vs single-process {want}"
    full_state = full.state_dict()
    for name, tensor in unshard_state_dict(model).items():
        torch.testing.assert_close(tensor, full_state[name], rtol=0, atol=0)

    # ---- KV-cache decode: one token per step, syncs per token = the formula
    with torch.no_grad():
        ref_cache, cache = full.new_cache(32), model.new_cache(32)
        prompt = tokens[:1, :5]
        torch.testing.assert_close(model(prompt, cache), full(prompt, ref_cache), rtol=RTOL, atol=ATOL)
        nxt = prompt[:, -1:]
        for step in range(3):
            comm.counter.reset()
            with CollectiveAudit() as audit:
                got_logits = model(nxt, cache)
            want_logits = full(nxt, ref_cache)
            where = f"{label} decode step {step}"
            torch.testing.assert_close(
                got_logits, want_logits, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}"
            )
            _check_counts(where, comm, audit, blocking, overlapped)
            nxt = want_logits[:, -1:].argmax(-1)

    # ---- the no-communication ceiling: zero collectives forward and backward, a different output
    comm.enabled = False
    try:
        comm.counter.reset()
        model.zero_grad(set_to_none=True)
        with CollectiveAudit() as audit:
            out_free = model(tokens)
            out_free.float().square().mean().backward()
        assert audit.total == 0, f"{label}: the ceiling issued {dict(audit.calls)}"
        assert comm.counter.blocking == blocking and comm.counter.overlapped == overlapped  # skipped, still counted
        assert out_free.shape == ref.shape and torch.isfinite(out_free).all()
        assert not torch.allclose(out_free, ref, rtol=RTOL, atol=ATOL), f"{label}: communication made no difference"
    finally:
        comm.enabled = True


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
