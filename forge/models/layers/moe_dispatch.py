"""Token dispatch to experts and back: dropless or with a capacity, optionally across an
expert-parallel group by all-to-all.

On each rank, with N tokens, top-k choices idx (N, k) and weights w (N, k):
 1. the N*k assignments (a = token*k + slot) are sorted by expert, stably, so inside an expert
    they stay in token order (flat token index b*T + t);
 2. capacity C (when given): an expert keeps the first C of its assignments in that order and
    drops the rest (a token never picks an expert twice, so the slot does not matter). Dropped
    assignments contribute zero; the token still flows through the residual path (and the
    other experts it picked). Dropping happens before dispatch: dropped tokens never travel;
 3. ep > 1: rank r holds experts [r E/ep, (r+1) E/ep); the per-expert counts of every rank are
    all-gathered (one small collective, also giving the group-wide loads for the balancing loss),
    the sorted tokens go to their expert's rank with all_to_all_single (split sizes from the
    counts), are regrouped by local expert, run, put back in arrival order and sent back by the
    reverse all-to-all. Autograd: the backward of an all-to-all is the reverse all-to-all;
 4. y[token] = sum over kept assignments of w * expert_out (index_add, in expert order).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from forge.parallel.mappings import group_rank, group_size

_COUNTERS: list[dict] = []      # the open `count_all_to_all` blocks' counters (none in production)


@contextlib.contextmanager
def count_all_to_all():
    """Count, while the block runs, the bytes this rank sends to other ranks through all_to_all
    (forward and backward) and the number of calls: yields {"all_to_all_bytes", "all_to_all_calls"}
    (for tools/bench_moe.py). Outside such a block nothing is counted."""
    stats = {"all_to_all_bytes": 0, "all_to_all_calls": 0}
    _COUNTERS.append(stats)
    try:
        yield stats
    finally:
        _COUNTERS.remove(stats)


def _all_to_all(x, out_splits, in_splits, group):
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if _COUNTERS:
        row = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        sent = (sum(in_splits) - in_splits[group_rank(group)]) * row
        for stats in _COUNTERS:
            stats["all_to_all_bytes"] += sent
            stats["all_to_all_calls"] += 1
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return _all_to_all(g, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x, out_splits: list[int], in_splits: list[int], group):
    """Rows x[sum(in_splits[:j]) : ...] go to rank j; rank j's rows for me arrive in order."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class DispatchStats:
    counts: torch.Tensor          # (E,) assignments per expert chosen on this rank (before drops)
    group_counts: torch.Tensor    # (E,) the same summed over the expert-parallel group
    kept: torch.Tensor            # (E,) assignments per expert kept on this rank
    dropped: torch.Tensor         # () assignments dropped on this rank
    assignments: int              # N * k on this rank


def capacity_for(capacity_factor, n_tokens: int, top_k: int, n_experts: int) -> int:
    """ceil(capacity_factor * tokens * top_k / n_experts)."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def dispatch_combine(x, idx, w, experts, n_experts: int, capacity=None, ep_group=None):
    """x (N, D), idx (N, k), w (N, k) -> (y (N, D), DispatchStats). `experts(rows, sizes)` runs
    this rank's local experts on rows grouped by local expert (sizes: rows per expert)."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    kept = counts
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        order = order[rank_in_expert < capacity]
        kept = counts.clamp(max=capacity)
    token = torch.div(order, k, rounding_mode="floor")
    rows = x[token]
    ep = group_size(ep_group)
    if ep == 1:
        group_counts = counts
        out = experts(rows, kept.tolist())
    else:
        local = n_experts // ep
        me = group_rank(ep_group)
        mine = torch.stack([counts, kept])
        parts = [torch.empty_like(mine) for _ in range(ep)]
        dist.all_gather(parts, mine, group=ep_group)
        every = torch.stack(parts)                                   # (ep, 2, E)
        group_counts = every[:, 0].sum(0)
        recv_mat = every[:, 1, me * local:(me + 1) * local]           # (ep, local): from rank s, for my experts
        send = kept.view(ep, local).sum(1).tolist()
        recv = recv_mat.sum(1).tolist()
        got = all_to_all(rows, recv, send, ep_group)                  # by source rank, then expert
        expert_of = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep), recv_mat.reshape(-1))
        perm = torch.argsort(expert_of, stable=True)                  # by expert, then source rank
        out = experts(got[perm], recv_mat.sum(0).tolist())
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        out = all_to_all(out[inv], send, recv, ep_group)
    weights = w.reshape(-1)[order].to(out.dtype)
    y = out.new_zeros(N, out.shape[-1]).index_add(0, token, out * weights.unsqueeze(-1))
    stats = DispatchStats(counts, group_counts, kept, counts.sum() - kept.sum(), N * k)
    return y, stats
