"""Paired autograd functions that move activations between tensor-parallel regions.

Each forward op is paired with its adjoint in backward (Megatron-LM's mappings):
    copy_to      forward: identity          backward: all-reduce
    reduce_from  forward: all-reduce        backward: identity
    scatter_to   forward: keep my slice     backward: all-gather
    gather_from  forward: all-gather        backward: keep my slice
Sequence-parallel variants work on the sequence dimension (dim 1 of (B, T, D)):
    gather_seq        forward: all-gather T          backward: reduce-scatter T
    reduce_scatter_seq forward: reduce-scatter T     backward: all-gather T
and all_reduce_sum (forward and backward: all-reduce), for a sum whose consumers differ per rank
(e.g. the statistics of a norm over a dimension split across ranks).
With group None (or size 1) every op is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x, group):
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x, dim, group):
    n = group_size(group)
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _gather(x, dim, group):
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, dim, group):
    parts = [p.contiguous() for p in x.chunk(group_size(group), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _GatherReduceScatter(torch.autograd.Function):
    """forward all-gather, backward reduce-scatter (sequence-parallel entry to a TP region)."""
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


def copy_to(x, group):
    return x if group_size(group) == 1 else _Copy.apply(x, group)


def all_reduce_sum(x, group):
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


def reduce_from(x, group):
    return x if group_size(group) == 1 else _Reduce.apply(x, group)


def scatter_to(x, dim, group):
    return x if group_size(group) == 1 else _Scatter.apply(x, dim, group)


def gather_from(x, dim, group):
    return x if group_size(group) == 1 else _Gather.apply(x, dim, group)


def gather_seq(x, group, dim: int = 1):
    return x if group_size(group) == 1 else _GatherReduceScatter.apply(x, dim, group)


def reduce_scatter_seq(x, group, dim: int = 1):
    return x if group_size(group) == 1 else _ReduceScatter.apply(x, dim, group)
