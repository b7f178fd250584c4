"""Megatron-style tensor-parallel layers; with group None (tp=1) they are ordinary layers.

ColumnParallelLinear:  Y = X A,   A = [A_1 ... A_p] split by output columns; rank i computes X A_i.
RowParallelLinear:     Y = X A,   A = [A_1; ...; A_p] split by input rows, X = [X_1 ... X_p];
                       rank i computes X_i A_i and the partial products are summed (all-reduce,
                       or reduce-scatter along the sequence under sequence parallelism).
                       residual_output=True marks the last projection of a residual branch,
                       whose weight forge.models.init draws with std / sqrt(2 L).
VocabParallelEmbedding: the vocabulary is split in contiguous ranges; each rank looks up the ids
                       in its range (zero elsewhere) and the partial embeddings are summed.
Weights are stored (out_features, in_features) as in nn.Linear, holding only this rank's shard;
a sharded parameter carries `partition_dim`, the dimension along which the full tensor is split.
A parameter that is replicated but receives partial gradients on each rank (a bias added after a
sequence-parallel reduce-scatter) enters the forward through `copy_to`, whose backward sums them.
quant (a forge.config.QuantConfig or None): the weight used is fake-quantised, W + mix (q(W) - W)
(forge.parallel.quant), its scale reduced over tp where the statistic spans the split dimension;
with model.quant.linear='bitlinear_1p58' the input is quantised too, y = q(X) q(W)^T + b (BitNet b1.58).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.kernels import linear   # F.linear unless the oneDNN CPU backend is on
from forge.parallel.mappings import (copy_to, gather_from, gather_seq, group_rank, group_size,
                                     reduce_from, reduce_scatter_seq, scatter_to)
from forge.parallel.quant import bitlinear_quant, embed_quant, weight_quant


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {d}")
    return n // d


def _mark(p, dim, group):
    """Record that `p` is this rank's shard of a tensor split along `dim` (when tp > 1)."""
    if p is not None and group_size(group) > 1:
        p.partition_dim = dim               # DeepSpeed's attribute: forge.deepspeed_compat.tag_parameters


def enter_tp_region(x, group, sequence_parallel=False):
    """The input of a tensor-parallel region: (B, T/tp, D) gathered along T under sequence
    parallelism, else (B, T, D) through copy_to. Layers that share one input enter once, so its
    gradient is reduced once (not once per projection)."""
    return gather_seq(x, group) if sequence_parallel else copy_to(x, group)


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns. Input (B, T, in) replicated (or (B, T/tp, in) when
    sequence_parallel: gathered first); output (B, T, out/tp), or (B, T, out) with gather_output."""

    def __init__(self, in_features, out_features, bias=True, group=None, gather_output=False,
                 sequence_parallel=False, skip_weight=False, input_ready=False, quant=None):
        super().__init__()
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.input_ready = input_ready      # the caller already applied enter_tp_region
        self.in_features, self.out_features = in_features, out_features
        local = _divide(out_features, group_size(group), "output features")
        # skip_weight: the weight is passed to forward (a head tied to an embedding on another stage)
        self.weight = None if skip_weight else nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        _mark(self.weight, 0, group)
        _mark(self.bias, 0, group)
        self.weight_quant = weight_quant(quant, group, 0)
        self.input_quant = None
        if quant is not None and quant.linear != "linear" and not skip_weight:
            self.weight_quant, self.input_quant = bitlinear_quant(quant, group, 0)

    def forward(self, x, weight=None):
        if not self.input_ready:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = self.weight if weight is None else weight
        y = linear(x, self.weight_quant(w) if self.weight_quant is not None else w, self.bias)
        return gather_from(y, -1, self.group) if self.gather_output else y


class ReplicatedLinear(nn.Module):
    """Y = X A + b with A whole on every rank, for outputs that ranks then use in part (kv heads
    shared by query heads on several ranks): weight, bias and input enter through `copy_to`, so
    their partial gradients are summed over the group."""

    def __init__(self, in_features, out_features, bias=True, group=None, sequence_parallel=False,
                 input_ready=False, quant=None):
        super().__init__()
        self.group, self.sequence_parallel, self.input_ready = group, sequence_parallel, input_ready
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_quant = weight_quant(quant)             # whole on every rank: no reduction
        self.input_quant = None
        if quant is not None and quant.linear != "linear":
            self.weight_quant, self.input_quant = bitlinear_quant(quant)

    def forward(self, x):  # (B, T, in) or (B, T/tp, in) -> (B, T, out)
        if not self.input_ready:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        if self.input_quant is not None:
            x = self.input_quant(x)
        b = copy_to(self.bias, self.group) if self.bias is not None else None
        w = copy_to(self.weight, self.group)
        return linear(x, self.weight_quant(w) if self.weight_quant is not None else w, b)


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by rows. Input (B, T, in/tp) (already split when input_is_parallel);
    output (B, T, out) summed over ranks, or (B, T/tp, out) when sequence_parallel."""

    def __init__(self, in_features, out_features, bias=True, group=None, input_is_parallel=True,
                 sequence_parallel=False, residual_output=False, quant=None):
        super().__init__()
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        self.residual_output = residual_output   # the output of a residual branch (scaled init)
        self.in_features, self.out_features = in_features, out_features
        local = _divide(in_features, group_size(group), "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        _mark(self.weight, 1, group)
        self.weight_quant = weight_quant(quant, group, 1)
        self.input_quant = None
        if quant is not None and quant.linear != "linear":
            self.weight_quant, self.input_quant = bitlinear_quant(quant, group, 1)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to(x, -1, self.group)
        if self.input_quant is not None:
            x = self.input_quant(x)
        y = linear(x, self.weight_quant(self.weight) if self.weight_quant is not None else self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.group)
            return y + copy_to(self.bias, self.group) if self.bias is not None else y
        y = reduce_from(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split in contiguous ranges across the group."""

    def __init__(self, num_embeddings, embedding_dim, group=None, quant=None):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _divide(num_embeddings, group_size(group), "vocab size (padded)")
        self.start = group_rank(group) * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        _mark(self.weight, 0, group)
        self.weight_quant = embed_quant(quant, group)      # the table as looked up (a tied head reads W)

    def forward(self, ids):  # (B, T) -> (B, T, D)
        w = self.weight_quant(self.weight) if self.weight_quant is not None else self.weight
        if group_size(self.group) == 1:
            return F.embedding(ids, w)
        local = ids - self.start
        outside = (local < 0) | (local >= w.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), w)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary: loss_i = log sum_v exp(z_iv) - z_i,y_i
    computed with one all-reduce each for the max, the target logit and the sum of exponentials."""

    @staticmethod
    def forward(ctx, logits, target, group, start):
        logits = logits.float()
        m = logits.max(dim=-1).values
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        z = logits - m.unsqueeze(-1)
        local = target - start
        inside = (local >= 0) & (local < logits.shape[-1])
        zt = torch.gather(z, -1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        zt = torch.where(inside, zt, torch.zeros_like(zt))
        torch.distributed.all_reduce(zt, group=group)
        e = z.exp()
        s = e.sum(dim=-1)
        torch.distributed.all_reduce(s, group=group)
        ctx.save_for_backward(e.div_(s.unsqueeze(-1)), local.clamp(0, logits.shape[-1] - 1), inside)
        return s.log() - zt

    @staticmethod
    def backward(ctx, g):
        p, local, inside = ctx.saved_tensors
        grad = p.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits, target, group=None, ignore_index: int = -100):
    """Per-token cross-entropy (…,) from logits (…, V/tp) split over `group` and targets (…,)."""
    if group_size(group) == 1:
        return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none",
                               ignore_index=ignore_index).view(target.shape)
    start = group_rank(group) * logits.shape[-1]
    loss = _VocabParallelCE.apply(logits, target.masked_fill(target == ignore_index, 0), group, start)
    return loss.masked_fill(target == ignore_index, 0.0)
