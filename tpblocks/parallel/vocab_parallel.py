"""Cross-entropy over a vocabulary-parallel head (Megatron's ``vocab_parallel_cross_entropy``).

With ``shard_model(..., vocab_parallel_head=True)`` rank r holds the logits of vocabulary rows
``[r V/G, (r+1) V/G)``. The loss needs three numbers per position from the whole vocabulary -- the max (for a
stable softmax), the sum of exponentials and the target's logit -- so two all-reduces of (b, s) tensors
replace the all-gather of (b, s, V) logits. Backward is local: softmax of the shard minus the one-hot target
where the target falls in this shard.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from ..models.comm import Communicator


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_nv: torch.Tensor, targets_n: torch.Tensor, comm: Communicator) -> torch.Tensor:
        logits_nv = logits_nv.float()
        shard = logits_nv.shape[-1]
        start = comm.lane_rank * shard
        group = getattr(comm, "group", None)
        distributed = group is not None and comm.lane_world > 1 and comm.enabled
        max_n = logits_nv.max(dim=-1).values
        if distributed:
            max_n = funcol.wait_tensor(funcol.all_reduce(max_n, "max", group))
        shifted_nv = logits_nv - max_n[:, None]
        exp_nv = shifted_nv.exp()
        local_t = targets_n - start
        mine_n = (local_t >= 0) & (local_t < shard)
        target_n = shifted_nv.gather(-1, local_t.clamp(0, shard - 1)[:, None]).squeeze(-1) * mine_n
        sums_2n = torch.stack([exp_nv.sum(-1), target_n])
        if distributed:
            sums_2n = funcol.wait_tensor(funcol.all_reduce(sums_2n, "sum", group))
        sum_exp_n, target_n = sums_2n
        ctx.save_for_backward(exp_nv / sum_exp_n[:, None], local_t, mine_n)
        return (sum_exp_n.log() - target_n).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax_nv, local_t, mine_n = ctx.saved_tensors
        grad_nv = softmax_nv.clone()
        rows = torch.nonzero(mine_n).squeeze(-1)
        grad_nv[rows, local_t[rows]] -= 1.0
        return grad_nv * (grad / softmax_nv.shape[0]), None, None


def vocab_parallel_cross_entropy(
    logits_bsv: torch.Tensor, targets_bs: torch.Tensor, comm: Communicator
) -> torch.Tensor:
    """Mean cross-entropy of this rank's logit shard (b, s, V/G) against global targets (b, s); same on every rank."""
    return _VocabParallelCrossEntropy.apply(logits_bsv.flatten(0, 1), targets_bs.flatten(), comm)
