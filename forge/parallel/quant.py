"""Fake quantisation for quantisation-aware training (model.quant; registry QUANT_METHOD).

A quantiser maps x to q(x) = s (c - z), c = clamp(round(x / s) + z, c_min, c_max), an integer code:
    symmetric (b bits):  s = max|x| / (2^(b-1) - 1),  z = 0,  c in [-2^(b-1), 2^(b-1) - 1]
    affine    (b bits):  s = (max x - min x) / (2^b - 1),  z = round(-min x / s),  c in [0, 2^b - 1]
    ternary:             s = mean|x| (absmean, BitNet b1.58),  z = 0,  c in {-1, 0, 1}   (b ignored)
so q(x) takes at most 2^b values (3 for ternary), |q(x) - x| <= s / 2 inside the clip range
[s (c_min - z - 1/2), s (c_max - z + 1/2)] (the values rounding reaches: all of them for symmetric
and affine, whose scale spans the tensor; |x| <= 1.5 s for ternary), and q(q(x)) = q(x) for symmetric and affine (their statistics of
q(x) equal those of x). Ternary keeps its codes, q(q(x)) / s' = q(x) / s, but not its scale:
mean|q(x)| = s * (fraction of nonzero codes).
The statistics (max|x|, min/max, mean|x|) are taken over the whole tensor ("tensor") or per
output channel, i.e. per row of a (out, in) weight ("channel"); activations per token (the last
dimension), so a token's quantisation never depends on other tokens (a scale shared over (B, T)
would let later tokens change earlier outputs). Scales are constants to autograd.

Training ramps from full precision: with mix = min(1, step / warmup_steps) (1 when warmup_steps=0,
and before the trainer's first set_quant_step),
    x_used = x + mix (q(x) - x),      d x_used / d x = (1 - mix) + mix * 1[x inside the clip range]
the straight-through estimator, clipped: identity inside the clip range, zero outside.
bits >= 16 is full precision: the tensor passes through untouched (bit for bit).

Tensor parallelism: a statistic over a dimension that is split across ranks is all-reduced over the
tp group (max and -min by MAX, sum |x| and the count by SUM) so every shard quantises as the whole
tensor would: per-tensor scales of any sharded weight, per-channel scales of a row-parallel weight
(its rows are split by input columns), per-token scales of activations whose features are split
(the inputs of wo and of the MLP's down projection). Per-channel scales of a column-parallel
weight and of a vocab-parallel embedding need no reduction: each rank holds whole rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from forge.parallel.mappings import group_size


def _reduce(t, group, op):
    if group is not None and group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _stat_dims(x, granularity):
    """The dims the statistic is taken over: all (tensor), all but 0 (channel), the last (token)."""
    if granularity == "tensor":
        return tuple(range(x.dim()))
    if granularity == "channel":
        return tuple(range(1, x.dim()))
    return (-1,)


def _codes_symmetric(x, bits, dims, group):
    n = 2 ** (bits - 1) - 1
    m = _reduce(x.abs().amax(dim=dims, keepdim=True), group, dist.ReduceOp.MAX)
    s = (m / n).clamp_min(torch.finfo(torch.float32).tiny)
    return s, torch.zeros_like(s), -(n + 1), n


def _codes_affine(x, bits, dims, group):
    hi = _reduce(x.amax(dim=dims, keepdim=True).clamp_min(0), group, dist.ReduceOp.MAX)
    nlo = _reduce((-x).amax(dim=dims, keepdim=True).clamp_min(0), group, dist.ReduceOp.MAX)  # 0 in range
    s = ((hi + nlo) / (2 ** bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    return s, torch.round(nlo / s), 0, 2 ** bits - 1


def _codes_ternary(x, bits, dims, group):
    total = _reduce(x.abs().sum(dim=dims, keepdim=True), group, dist.ReduceOp.SUM)
    count = torch.full_like(total, float(x.numel() // total.numel()))
    s = (total / _reduce(count, group, dist.ReduceOp.SUM)).clamp_min(1e-5)   # BitNet's eps
    return s, torch.zeros_like(s), -1, 1


QUANT_METHOD = {"symmetric": _codes_symmetric, "affine": _codes_affine, "ternary": _codes_ternary}


def quantize(x, method, bits, granularity="tensor", group=None):
    """(q(x), inside): the fake-quantised tensor and the mask of the clip range (see module doc).
    group: the tp group over which the statistic's dimensions are split (None: not split)."""
    xf = x.detach().float()
    s, z, cmin, cmax = QUANT_METHOD[method](xf, bits, _stat_dims(xf, granularity), group)
    r = xf / s + z
    q = (torch.round(r).clamp(cmin, cmax) - z) * s
    inside = (r >= cmin - 0.5) & (r <= cmax + 0.5)           # where rounding, not the clamp, decides
    return q.to(x.dtype), inside


class _Mix(torch.autograd.Function):
    """x + mix (q - x) forward (q exactly at mix = 1); gradient (1 - mix) + mix * inside
    (inside all True: the plain straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, q, inside, mix):
        ctx.save_for_backward(inside)
        ctx.mix = mix
        return q.clone() if mix == 1.0 else x + mix * (q - x)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * ((1 - ctx.mix) + ctx.mix * inside.to(g.dtype)), None, None, None


class FakeQuant(nn.Module):
    """x -> x + mix (q(x) - x) with the clipped straight-through gradient (module docstring).
    `mix` is set by set_quant_step; group: the tp group over which the statistic is split."""

    def __init__(self, method: str, bits: int, granularity: str = "tensor", group=None, clipped: bool = True):
        super().__init__()
        self.method, self.bits, self.granularity, self.group = method, bits, granularity, group
        self.clipped = clipped          # False: identity gradient everywhere (BitNet's STE)
        self.warmup_steps, self.mix = 0, 1.0

    def extra_repr(self):
        return f"{self.method}, bits={self.bits}, {self.granularity}, mix={self.mix:g}"

    def forward(self, x):
        if self.mix == 0.0 or (self.method != "ternary" and self.bits >= 16):
            return x
        q, inside = quantize(x, self.method, self.bits, self.granularity, self.group)
        if not self.clipped:
            inside = torch.ones_like(inside)
        return _Mix.apply(x, q, inside, float(self.mix))


def ramp(step: int, warmup_steps: int) -> float:
    """mix = min(1, step / warmup_steps); 1 without warm-up."""
    return 1.0 if warmup_steps <= 0 else min(1.0, max(0, step) / warmup_steps)


def set_quant_step(module: nn.Module, step: int) -> None:
    """Tell every FakeQuant under `module` the training step it runs (the trainer calls this before
    each step; the ramp is explicit state, no global)."""
    for m in module.modules():
        if isinstance(m, FakeQuant):
            m.mix = ramp(step, m.warmup_steps)


LINEAR_KIND = {   # model.quant.linear: how every attention / MLP projection quantises (None: as configured)
    "linear": None,
    # BitNet b1.58 (Ma et al. 2024): W -> absmean ternary (one scale per tensor), the input X -> per-token
    # absmax int8 (s = max|x_t| / 127, codes in [-128, 127]), y = q(X) q(W)^T + b; plain STE for both
    "bitlinear_1p58": (("ternary", 2), ("symmetric", 8)),
}


def bitlinear_quant(qc, group=None, partition_dim=None):
    """(weight FakeQuant, input FakeQuant) of a model.quant.linear='bitlinear_1p58' projection, or
    (None, None). The weight's per-tensor mean |W| is reduced over tp when the weight is split; the
    input's per-token max |x| when its features are split (a row-parallel layer, partition_dim 1)."""
    kind = LINEAR_KIND[qc.linear] if qc is not None else None
    if kind is None:
        return None, None
    split = partition_dim is not None and group_size(group) > 1
    (wm, wb), (am, ab) = kind
    w = FakeQuant(wm, wb, "tensor", group if split else None, clipped=False)
    a = FakeQuant(am, ab, "token", group if split and partition_dim == 1 else None, clipped=False)
    w.warmup_steps = a.warmup_steps = qc.warmup_steps
    return w, a


def weight_quant(qc, group=None, partition_dim=None):
    """The FakeQuant of a weight under model.quant `qc` (None when weights are not quantised).
    partition_dim: the dim along which this rank's shard is split (None: whole); the statistic
    is reduced over tp when it spans that dim."""
    if qc is None or qc.weight_method is None:
        return None
    split = partition_dim is not None and group_size(group) > 1
    spans = split and (qc.weight_granularity == "tensor" or partition_dim == 1)
    fq = FakeQuant(qc.weight_method, qc.weight_bits, qc.weight_granularity, group if spans else None)
    fq.warmup_steps = qc.warmup_steps
    return fq


def embed_quant(qc, group=None):
    """The FakeQuant of an embedding table (rows = tokens or positions, split over tp for the
    vocabulary: per-row scales need no reduction, a per-tensor one does)."""
    if qc is None or qc.embed_method is None:
        return None
    split = group_size(group) > 1 and qc.embed_granularity == "tensor"
    fq = FakeQuant(qc.embed_method, qc.embed_bits, qc.embed_granularity, group if split else None)
    fq.warmup_steps = qc.warmup_steps
    return fq


def act_quant(qc, point: str, group=None):
    """The FakeQuant of the activation at `point` (per token; `group`: the tp group when its
    features are split across ranks), or None when that point is not quantised."""
    if qc is None or qc.act_method is None or point not in qc.act_points:
        return None
    fq = FakeQuant(qc.act_method, qc.act_bits, "token", group if group_size(group) > 1 else None)
    fq.warmup_steps = qc.warmup_steps
    return fq
