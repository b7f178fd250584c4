"""Normalisations (registry NORM), each mapping (..., D) -> (..., D).

layernorm:          y = (x - mean) / sqrt(var + eps) * w + b        (bias optional)
nonparam_layernorm: y = (x - mean) / sqrt(var + eps)                (OLMo: no weight, no bias)
rmsnorm:            y = x / sqrt(mean(x^2) + eps) * (offset + w)     (Gemma: offset 1, w init 0)
scalenorm:          y = g * x / max(||x||, eps)                      (one learned scalar g)
Statistics are computed in fp32 and the result cast back to the input dtype. `init_constants`
puts the learned gains back to their initial values (forge.models.init, after a meta build).
Tensor parallelism: `grad_group` makes the weights enter through `copy_to`, so the partial
gradients of a replicated norm that sees only part of the tokens or heads (sequence parallelism,
per-head qk-norm) are summed over the group; `stat_group` (RMSNorm) computes mean(x^2) over a
dimension split across the group (OLMo 2's qk-norm over all heads), with `full_dim` its size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.parallel.mappings import all_reduce_sum, copy_to


def _w(p, group):
    return None if p is None else copy_to(p, group).float()


class LayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-5, bias=True, affine=True):
        super().__init__()
        self.eps, self.dim = eps, dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None
        self.grad_group = None

    def init_constants(self):
        if self.weight is not None:
            self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x):
        w, b = _w(self.weight, self.grad_group), _w(self.bias, self.grad_group)
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.grad_group, self.stat_group, self.full_dim = None, None, dim

    def init_constants(self):
        self.weight.fill_(1.0 - self.offset)

    def forward(self, x):
        xf = x.float()
        if self.stat_group is None:
            ms = xf.pow(2).mean(-1, keepdim=True)
        else:
            ms = all_reduce_sum(xf.pow(2).sum(-1, keepdim=True), self.stat_group) / self.full_dim
        y = xf * torch.rsqrt(ms + self.eps)
        return (y * (self.offset + _w(self.weight, self.grad_group))).to(x.dtype)


class ScaleNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.tensor(float(dim) ** 0.5))
        self.grad_group, self.dim = None, dim

    def init_constants(self):
        self.weight.fill_(float(self.dim) ** 0.5)

    def forward(self, x):
        xf = x.float()
        return (_w(self.weight, self.grad_group) * xf / xf.norm(dim=-1, keepdim=True).clamp_min(self.eps)).to(x.dtype)


NORM = {
    "layernorm": lambda dim, cfg: LayerNorm(dim, cfg.norm_eps, bias=cfg.norm_bias),
    "nonparam_layernorm": lambda dim, cfg: LayerNorm(dim, cfg.norm_eps, affine=False),
    "rmsnorm": lambda dim, cfg: RMSNorm(dim, cfg.norm_eps, cfg.norm_offset),
    "scalenorm": lambda dim, cfg: ScaleNorm(dim, cfg.norm_eps),
}


def build_norm(cfg, dim=None, grad_group=None) -> nn.Module:
    norm = NORM[cfg.norm](dim or cfg.d_model, cfg)
    norm.grad_group = grad_group
    return norm
