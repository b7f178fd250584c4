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


def _identity(x, dim, group):
    return x


def _all_reduce(x, dim, group):
    x = x.clone().contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x, dim, group):
    return x.chunk(group_size(group), dim=dim)[group_rank(group)].contiguous()


def _gather(x, dim, group):
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, dim, group):
    parts = [p.contiguous() for p in x.chunk(group_size(group), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _paired(forward_op, backward_op):
    """An autograd function that applies forward_op and, to the gradient, backward_op."""
    class Paired(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dim, group):
            ctx.dim, ctx.group = dim, group
            return forward_op(x, dim, group)

        @staticmethod
        def backward(ctx, g):
            return backward_op(g, ctx.dim, ctx.group), None, None
    return Paired


_COPY = _paired(_identity, _all_reduce)
_REDUCE = _paired(_all_reduce, _identity)
_ALL_REDUCE_SUM = _paired(_all_reduce, _all_reduce)
_SCATTER = _paired(_split, _gather)
_GATHER = _paired(_gather, _split)
_GATHER_SEQ = _paired(_gather, _reduce_scatter)
_REDUCE_SCATTER_SEQ = _paired(_reduce_scatter, _gather)


def _apply(op, x, dim, group):
    return x if group_size(group) == 1 else op.apply(x, dim, group)


def copy_to(x, group):
    return _apply(_COPY, x, -1, group)


def reduce_from(x, group):
    return _apply(_REDUCE, x, -1, group)


def all_reduce_sum(x, group):
    return _apply(_ALL_REDUCE_SUM, x, -1, group)


def scatter_to(x, dim, group):
    return _apply(_SCATTER, x, dim, group)


def gather_from(x, dim, group):
    return _apply(_GATHER, x, dim, group)


def gather_seq(x, group, dim: int = 1):
    return _apply(_GATHER_SEQ, x, dim, group)


def reduce_scatter_seq(x, group, dim: int = 1):
    return _apply(_REDUCE_SCATTER_SEQ, x, dim, group)
