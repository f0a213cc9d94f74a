"""Run a function on N gloo ranks with torch.multiprocessing; the sharded-vs-single-process parity checker.

    run_workers(my_check, world=2, args=(cfg_dict,))     # my_check(rank, world, *args) runs in each process

The worker must be a module-level function (it is pickled by name). Each rank runs with one thread, a
file-based rendezvous (no TCP port to collide on), and the process group torn down afterwards. An exception in
any rank fails the call with that rank's traceback.

    check_sharded_parity(label, full, comm, blocking=..., overlapped=..., seq_len=9, prompt_len=5)

runs inside such a worker: a lane-sharded copy of ``full`` against ``full`` itself (forward, gradients, norm,
unshard, KV-cache decode, syncs counted twice, the no-communication ceiling).
"""

from __future__ import annotations

import copy
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tpblocks.models.layers import local
from tpblocks.parallel import CollectiveAudit, clip_grad_norm_, local_slice, shard_model, unshard_state_dict


def _entry(rank: int, world: int, init_file: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int = 2, args: tuple = ()) -> None:
    """Spawn ``world`` processes running ``fn(rank, world, *args)`` in a gloo process group; re-raise failures."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_entry, args=(world, init_file, fn, args), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------------- parity checker
RTOL, ATOL = 1e-4, 2e-5  # fp32: only the summation order differs between 1 and 2 processes


def all_ranks(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` of every rank of the default group, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """True if ``t`` is bit-identical on every rank of the default group."""
    parts = all_ranks(t)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def check_counts(label: str, comm, audit, blocking: int, overlapped: int) -> None:
    """``comm.counter`` and the ``CollectiveAudit`` both saw ``blocking`` + ``overlapped`` (async) syncs."""
    got = comm.counter.snapshot()
    assert comm.counter.blocking == blocking, f"{label}: {got} vs {blocking} blocking"
    assert comm.counter.overlapped == overlapped, f"{label}: {got} vs {overlapped} overlapped"
    assert audit.total == blocking + overlapped, f"{label}: audit {dict(audit.calls)} vs {blocking + overlapped}"
    assert audit.async_ops == overlapped, f"{label}: {audit.async_ops} async collectives, want {overlapped}"


def check_grad_slices(model, full, label: str, *, strict: bool = True) -> None:
    """Every local gradient of sharded ``model`` equals its ``shard_spec`` slice of ``full``'s gradient.

    ``strict`` also requires a non-zero reference gradient (else the check is vacuous) and bit-identical
    gradients of replicated parameters on every rank.
    """
    full_params = dict(full.named_parameters())
    for name, p in model.named_parameters():
        expected = local_slice(full_params[name].grad, model.shard_spec, name)
        scale = expected.abs().max().item()
        where = f"{label} gradient of {name}"
        if strict:
            assert scale > 0, f"{label}: {name} got no gradient in the reference; the check would be vacuous"
        torch.testing.assert_close(
            local(p.grad), expected, rtol=RTOL, atol=ATOL * scale, msg=lambda m, w=where: f"{w}: {m}"
        )
        if strict and name not in model.shard_spec:  # replicated: bit-identical on every lane rank
            assert same_on_all_ranks(local(p.grad)), f"{label}: replicated {name} has different grads per rank"


def check_grad_norm(model, full, label: str) -> None:
    """The sharded global gradient norm (what clipping uses) is the single-process one, on every rank."""
    want = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in full.parameters())).item()
    got = clip_grad_norm_(model, None)
    assert abs(got - want) <= 1e-5 * want, f"{label}: sharded grad norm {got} vs single-process {want}"
    assert same_on_all_ranks(torch.tensor([got]))


def check_sharded_parity(
    label: str, full, comm, *, blocking: int, overlapped: int, seq_len: int, prompt_len: int, check_shards=None
) -> None:
    """A lane-sharded copy of ``full`` over ``comm`` equals ``full`` run in one process.

    Checks forward logits, per-parameter gradients against their ``shard_spec`` slices (replicated ones equal
    on every rank), the global gradient norm, ``unshard_state_dict``, KV-cache prefill + 3 decode steps, and
    ``blocking`` / ``overlapped`` syncs per forward and per decode token through ``comm.counter`` and
    ``CollectiveAudit``; then the no-communication ceiling (``comm.enabled = False``): zero collectives forward
    and backward and an output that differs. ``check_shards(model)`` inspects the sharded model first.
    """
    cfg = full.cfg
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=gen)
    ref = full(tokens)
    F.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()

    model = shard_model(copy.deepcopy(full), comm, lane_dtensors=True)  # as training shards it
    model.zero_grad(set_to_none=True)
    if check_shards is not None:
        check_shards(model)
    assert model.num_parameters() < full.num_parameters(), f"{label}: nothing was sharded"

    # ---- forward, counted twice (the model's own counter and the independent torch.distributed audit)
    comm.counter.reset()
    with CollectiveAudit() as audit:
        out = model(tokens)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label} forward: {m}")
    check_counts(label, comm, audit, blocking, overlapped)

    # ---- backward: local gradients are slices of the single-process gradients; norm; gathered weights
    F.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
    check_grad_slices(model, full, label)
    check_grad_norm(model, full, label)
    full_state = full.state_dict()
    for name, tensor in unshard_state_dict(model).items():
        torch.testing.assert_close(tensor, full_state[name], rtol=0, atol=0)

    # ---- KV-cache prefill + decode equals the single-process decode, with the same syncs per token
    with torch.no_grad():
        ref_cache, cache = full.new_cache(32), model.new_cache(32)
        prompt = tokens[:1, :prompt_len]
        torch.testing.assert_close(model(prompt, cache), full(prompt, ref_cache), rtol=RTOL, atol=ATOL)
        nxt = prompt[:, -1:]
        for step in range(3):
            comm.counter.reset()
            with CollectiveAudit() as audit:
                got = model(nxt, cache)
            want = full(nxt, ref_cache)
            where = f"{label} decode step {step}"
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")
            check_counts(where, comm, audit, blocking, overlapped)
            nxt = want[:, -1:].argmax(-1)

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
