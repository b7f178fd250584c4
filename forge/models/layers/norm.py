"""Normalisations (registry NORM), each mapping (..., D) -> (..., D).

layernorm:          y = (x - mean) / sqrt(var + eps) * w + b        (bias optional)
nonparam_layernorm: y = (x - mean) / sqrt(var + eps)                (OLMo: no weight, no bias)
rmsnorm:            y = x / sqrt(mean(x^2) + eps) * (offset + w)     (Gemma: offset 1, w init 0)
scalenorm:          y = g * x / max(||x||, eps)                      (one learned scalar g)
prmsnorm:           y = x / sqrt(mean(x[:k]^2) + eps) * (offset + w),  k = ceil(prmsnorm_pct * D)
                    (partial RMSNorm, Zhang & Sennrich 2019: the statistic from the first k
                    features, applied to all D; k = D is RMSNorm)
hyperspherenorm:    y = r * x / max(||x||, eps)                      (||y|| = r: onto the sphere of
                    radius r; r a learned scalar, init hsnorm_radius or sqrt(D), or fixed;
                    learned from sqrt(D) it is scalenorm's function)
dyt:                y = gamma * tanh(alpha * x) + beta               (Dynamic Tanh, Zhu et al. 2025:
                    alpha a learned scalar, init dyt_alpha_init; gamma ones, beta zeros; no statistic)
identity:           y = x
Statistics are computed in fp32 and the result cast back to the input dtype. `init_constants`
puts the learned gains back to their initial values (forge.models.init, after a meta build).
Each location may use its own kind (model.norm_attn, norm_mlp, norm_post, norm_final; see
ModelConfig.norm_at). Tensor parallelism: `grad_group` makes every learned tensor (gains, biases
and scalars such as DyT's alpha or the sphere radius) enter through `copy_to`, so the partial
gradients of a replicated norm that sees only part of the tokens or heads (sequence parallelism,
per-head qk-norm) are summed over the group; `stat_group` (RMSNorm) computes mean(x^2) over a
dimension split across the group (OLMo 2's qk-norm over all heads), with `full_dim` its size.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.parallel.mappings import all_reduce_sum, copy_to, group_size


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


class PRMSNorm(nn.Module):
    """RMSNorm whose mean square is taken over the first k = ceil(pct * D) features only. (No
    stat_group: the first k features of a dimension split over tp ranks live on some ranks only.)"""

    def __init__(self, dim, pct=1.0, eps=1e-6, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.k = max(1, math.ceil(round(pct * dim, 6)))
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.grad_group = None

    def init_constants(self):
        self.weight.fill_(1.0 - self.offset)

    def forward(self, x):  # (..., D) -> (..., D)
        xf = x.float()
        ms = xf[..., :self.k].pow(2).mean(-1, keepdim=True)                     # (..., 1)
        y = xf * torch.rsqrt(ms + self.eps)
        return (y * (self.offset + _w(self.weight, self.grad_group))).to(x.dtype)


class HyperSphereNorm(nn.Module):
    """Projection onto the sphere of radius r: r learned (a (1,) parameter) or a fixed float."""

    def __init__(self, dim, radius: Optional[float] = None, learned=True, eps=1e-5):
        super().__init__()
        self.eps, self.r0 = eps, float(radius) if radius is not None else float(dim) ** 0.5
        self.radius = nn.Parameter(torch.full((1,), self.r0)) if learned else self.r0
        self.grad_group = None

    def init_constants(self):
        if isinstance(self.radius, nn.Parameter):
            self.radius.fill_(self.r0)

    def forward(self, x):  # (..., D) -> (..., D)
        xf = x.float()
        r = _w(self.radius, self.grad_group) if isinstance(self.radius, nn.Parameter) else self.r0
        return (r * xf / xf.norm(dim=-1, keepdim=True).clamp_min(self.eps)).to(x.dtype)


class DyT(nn.Module):
    """Dynamic Tanh: an element-wise stand-in for a norm (no statistic over features or tokens)."""

    def __init__(self, dim, alpha_init=0.5):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))           # gamma
        self.bias = nn.Parameter(torch.zeros(dim))            # beta
        self.grad_group = None

    def init_constants(self):
        self.alpha.fill_(self.alpha_init)
        self.weight.fill_(1.0)
        self.bias.zero_()

    def forward(self, x):  # (..., D) -> (..., D)
        g = self.grad_group
        y = _w(self.weight, g) * torch.tanh(_w(self.alpha, g) * x.float()) + _w(self.bias, g)
        return y.to(x.dtype)


class IdentityNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.grad_group = None

    def forward(self, x):
        return x


NORM = {
    "layernorm": lambda dim, cfg: LayerNorm(dim, cfg.norm_eps, bias=cfg.norm_bias),
    "nonparam_layernorm": lambda dim, cfg: LayerNorm(dim, cfg.norm_eps, affine=False),
    "rmsnorm": lambda dim, cfg: RMSNorm(dim, cfg.norm_eps, cfg.norm_offset),
    "scalenorm": lambda dim, cfg: ScaleNorm(dim, cfg.norm_eps),
    "prmsnorm": lambda dim, cfg: PRMSNorm(dim, cfg.prmsnorm_pct, cfg.norm_eps, cfg.norm_offset),
    "hyperspherenorm": lambda dim, cfg: HyperSphereNorm(dim, cfg.hsnorm_radius, cfg.hsnorm_radius_learned, cfg.norm_eps),
    "dyt": lambda dim, cfg: DyT(dim, cfg.dyt_alpha_init),
    "identity": lambda dim, cfg: IdentityNorm(),
}


def build_norm(cfg, dim=None, grad_group=None, kind: Optional[str] = None) -> nn.Module:
    """A norm of kind `kind` (default model.norm) over `dim` features (default d_model)."""
    norm = NORM[kind or cfg.norm](dim or cfg.d_model, cfg)
    norm.grad_group = grad_group
    return norm


def build_split_norm(cfg, local_dim: int, group, kind: Optional[str] = None, key: str = "model.norm",
                     what: str = "this norm") -> nn.Module:
    """A norm of kind `kind` over local_dim * tp features of which this rank holds local_dim (heads or
    hidden features split over the tp `group`): RMSNorm's mean square is the all-reduced sum of
    squares / (local_dim * tp) (stat_group), its weight this rank's shard (partition_dim 0). Other
    kinds with tp > 1: ValueError naming `key` (identity has nothing to split; `what`: the norm's role)."""
    norm = build_norm(cfg, local_dim, kind=kind)
    tp = group_size(group)
    if tp > 1 and not isinstance(norm, IdentityNorm):
        if not isinstance(norm, RMSNorm):
            raise ValueError(f"{key}={kind or cfg.norm!r} with parallel.tp > 1: {what} spans features split over "
                             f"tp, which only 'rmsnorm' (mean square all-reduced) or 'identity' can")
        norm.stat_group, norm.full_dim = group, local_dim * tp
        norm.weight.partition_dim = 0
    return norm
