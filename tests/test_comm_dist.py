"""MeshComm's autograd collectives on 2 gloo ranks, against the math they stand for (values, gradients, and
the backward collectives ``comm.backward_counter`` counts): Megatron's f/g, the merge gather, the delayed sum."""

from __future__ import annotations

import torch
from dist_utils import all_ranks, run_workers


def _grad_through(fn, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = fn(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad


def _worker(rank: int, world: int) -> None:
    from tpblocks.parallel import MeshComm

    comm = MeshComm()
    torch.manual_seed(10 + rank)  # different values per rank: a missing or extra sum shows
    x, up = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    total_x, total_up = sum(all_ranks(x)), sum(all_ranks(up))

    y, grad = _grad_through(comm.tp_enter, x, up)  # f: identity forward, all-reduce backward
    assert torch.equal(y, x) and torch.allclose(grad, total_up)
    y, grad = _grad_through(comm.tp_reduce, x, up)  # g: all-reduce forward, identity backward
    assert torch.allclose(y, total_x) and torch.equal(grad, up)
    up_wide = torch.randn(2, 3, 4 * world)
    y, grad = _grad_through(comm.lane_gather, x, up_wide)  # gather: this rank's slice of the gradient back
    assert torch.equal(y, torch.cat(all_ranks(x), dim=-1))
    assert torch.equal(grad, up_wide[..., rank * 4 : (rank + 1) * 4])
    y, grad = _grad_through(lambda t: comm.lane_sum_start(t[None]).wait(), x, up)  # delayed sum: f's backward
    assert torch.allclose(y, total_x) and torch.allclose(grad, total_up)
    counts = comm.backward_counter.snapshot()
    assert (counts["tp_enter"], counts["lane_sum"], counts["blocking"]) == (1, 1, 2), counts


def test_mesh_comm_autograd_collectives_two_ranks():
    run_workers(_worker, world=2)
