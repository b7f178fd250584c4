"""Tensor parallelism for the plain norms of forge.models.layers.norm, applied from outside.

A norm there is single-device math with two points where a layout may step in (both default to
the single-device form); the functions here fill them, taking the norm as an argument (parallel/
does not import models):
  sum_grads_over(norm, group)    every learned tensor p (gains, biases, DyT's alpha, the sphere
                                 radius) enters forward as copy_to(p, group): identity forward,
                                 gradients summed over the group. For a replicated norm that sees
                                 only part of the tokens (sequence parallelism) or of the heads
                                 (per-head qk-norm, MLA's norms): each rank's gradient is partial.
  split_over(norm, group, ...)   a norm over D = local_dim * tp features of which this rank holds
                                 local_dim (heads or hidden features split over tp): the mean
                                 square becomes all_reduce(sum_i x_i^2) / D and the weight this
                                 rank's shard (partition_dim 0). Only a norm that says it can
                                 (`tp_splittable`): RMSNorm (`mean_square`), identity (nothing to do).
"""
from __future__ import annotations

import functools

import torch.nn as nn

from forge.parallel.mappings import all_reduce_sum, copy_to, group_size


def sum_grads_over(norm: nn.Module, group) -> nn.Module:
    """`norm` with its learned tensors entering forward through copy_to(., group) (group None: unchanged)."""
    norm.param_map = None if group is None else functools.partial(copy_to, group=group)
    return norm


def _split_mean_square(xf, group, full_dim):
    """(..., local_dim) -> (..., 1): mean of x^2 over all full_dim features, summed over the group."""
    return all_reduce_sum(xf.pow(2).sum(-1, keepdim=True), group) / full_dim


def split_over(norm: nn.Module, group, local_dim: int, key: str = "model.norm", kind: str | None = None,
               what: str = "this norm") -> nn.Module:
    """`norm` over local_dim * tp features split over the tp `group` (see the module docstring). A norm
    that is not `tp_splittable` with tp > 1: ValueError naming the config `key` and its value `kind`
    (`what`: the norm's role)."""
    tp = group_size(group)
    if tp > 1:
        if not getattr(norm, "tp_splittable", False):
            raise ValueError(f"{key}={kind!r} with parallel.tp > 1: {what} spans features split over "
                             f"tp, which only 'rmsnorm' (mean square all-reduced) or 'identity' can")
        if hasattr(norm, "mean_square"):
            norm.mean_square = functools.partial(_split_mean_square, group=group, full_dim=local_dim * tp)
            norm.weight.partition_dim = 0      # DeepSpeed's attribute: forge.deepspeed_compat.tag_parameters
    return norm
