"""Point-to-point links between the ranks that own neighbouring time slices of an MGRIT solve.

The solver only needs four operations: pass the state at my right boundary to the next rank while taking
my left boundary from the previous one (``exchange``), the two halves of that (``recv_prev``/``send_next``,
for the sequential coarsest solve), and a sum over the group (residual norms, gradients). ``Link`` is the
single-rank implementation (no neighbours); ``DistLink`` uses torch.distributed send/recv (gloo or nccl).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Link:
    """No neighbours: one rank holds the whole stack (and the tests of the algorithm run on it)."""

    rank: int = 0
    world: int = 1
    prev: int | None = None
    next: int | None = None

    def exchange(self, send: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """Send ``send`` to the next rank, return the tensor received from the previous rank (None if first)."""
        return None

    def recv_prev(self, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def send_next(self, tensor: torch.Tensor) -> None:
        return None

    def flush(self) -> None:
        """Wait for sends still in flight."""
        return None

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src_pos: int) -> torch.Tensor:
        return tensor

    def reversed(self) -> Link:
        """The same link with neighbours swapped (the adjoint runs from the last rank to the first)."""
        return self


class DistLink(Link):
    """Neighbours in a torch.distributed group. ``order`` is the solve's rank order (group ranks)."""

    def __init__(self, group: dist.ProcessGroup | None = None, order: list[int] | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.group_rank = dist.get_rank(group)
        self.order = list(order) if order is not None else list(range(self.world))
        pos = self.order.index(self.group_rank)
        self.rank = pos  # position along the solve
        self.prev = self._global(self.order[pos - 1]) if pos > 0 else None
        self.next = self._global(self.order[pos + 1]) if pos + 1 < self.world else None
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def exchange(self, send: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        self.flush()
        req = None
        if self.next is not None:
            send = send.contiguous()
            req = dist.isend(send, self.next, group=self.group)
        got = None
        if self.prev is not None:
            got = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            dist.recv(got, self.prev, group=self.group)
        if req is not None:
            req.wait()
        return got

    def recv_prev(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.prev is None:
            return None
        got = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        dist.recv(got, self.prev, group=self.group)
        return got

    def send_next(self, tensor: torch.Tensor) -> None:
        if self.next is not None:
            tensor = tensor.contiguous()
            # Kept alive until flushed: the buffer must not be freed while gloo may still read it.
            self._pending.append((dist.isend(tensor, self.next, group=self.group), tensor))

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        device = tensor.device
        if dist.get_backend(self.group) == "nccl" and device.type != "cuda":
            tensor = tensor.cuda()  # nccl reduces device tensors only (residual norms are kept on the CPU)
        out = tensor.clone()
        dist.all_reduce(out, group=self.group)
        return out.to(device)

    def broadcast(self, tensor: torch.Tensor, src_pos: int) -> torch.Tensor:
        """Broadcast from the rank at position ``src_pos`` of the solve order (every rank passes a buffer)."""
        out = tensor.contiguous().clone()
        dist.broadcast(out, self._global(self.order[src_pos]), group=self.group)
        return out

    def reversed(self) -> DistLink:
        return DistLink(self.group, self.order[::-1])
