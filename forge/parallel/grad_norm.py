"""The global gradient norm of a model split over tensor, pipeline and expert parallelism, and
clipping by it (one process's torch.nn.utils.clip_grad_norm_, over every rank's part)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from forge.deepspeed_compat import pipe_replicated
from forge.parallel.groups import ParallelGroups


def global_grad_norm(params, groups: ParallelGroups) -> torch.Tensor:
    """sqrt(sum of ||g||^2 over the distinct parameters of the whole model): a tp shard counts on
    every tp rank, a replicated tensor on tp rank 0 only, a tied copy on a later pipeline stage
    (DeepSpeed marks it ds_pipe_replicated) not at all, experts summed over the ep group; summed
    over the tp and pp groups."""
    params = list(params)
    device = params[0].device if params else torch.device("cpu")   # NCCL reduces device tensors
    counted = ([], [])                                             # (dense, experts) gradients
    for p in params:
        if p.grad is None or pipe_replicated(p):
            continue
        if getattr(p, "partition_dim", None) is not None or groups.tp_rank == 0:
            counted[int(getattr(p, "expert", False))].append(p.grad.detach())
    # per-tensor norms accumulated in fp64 by fused kernels (torch._foreach_norm), then summed
    sq = torch.stack([torch.stack(torch._foreach_norm(g, 2, dtype=torch.float64)).pow(2).sum() if g else
                      torch.zeros((), dtype=torch.float64, device=device) for g in counted])
    if groups.ep > 1:                  # each expert-parallel rank holds other experts
        dist.all_reduce(sq[1:], group=groups.ep_group)
    sq = sq.sum()
    for group, size in ((groups.tp_group, groups.tp), (groups.pp_group, groups.pp)):
        if size > 1:
            dist.all_reduce(sq, group=group)
    return sq.sqrt()


def clip_global_grad_norm(params, max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) with the global norm (as
    torch.nn.utils.clip_grad_norm_ does for one process); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, groups)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in params]
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm
