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
ModelConfig.norm_at). The classes are single-device math; tensor parallelism is applied from
forge.parallel.norms through two points that default to the single-device form: `param_map`, how
every learned tensor enters forward (sum_grads_over: copy_to, gradients summed over tp, for a
replicated norm that sees only part of the tokens or heads), and RMSNorm's `mean_square`, its
statistic (split_over: all-reduced over features split across tp, OLMo 2's qk-norm over all heads).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.parallel.norms import split_over, sum_grads_over


class _Norm(nn.Module):
    """A learned tensor p enters forward as `learned(p)`: fp32, through `param_map` first when a
    layout set one (forge.parallel.norms.sum_grads_over). `tp_splittable`: its features may be split
    over tp ranks (forge.parallel.norms.split_over): RMSNorm (its mean_square all-reduced), identity."""
    param_map = None
    tp_splittable = False

    def learned(self, p):
        if p is None:
            return None
        return (p if self.param_map is None else self.param_map(p)).float()


class LayerNorm(_Norm):
    def __init__(self, dim, eps=1e-5, bias=True, affine=True):
        super().__init__()
        self.eps, self.dim = eps, dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def init_constants(self):
        if self.weight is not None:
            self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x):
        w, b = self.learned(self.weight), self.learned(self.bias)
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


def mean_square(xf):
    """(..., D) -> (..., 1): mean of x^2 over the features."""
    return xf.pow(2).mean(-1, keepdim=True)


class RMSNorm(_Norm):
    """`mean_square`: the statistic (forge.parallel.norms.split_over all-reduces it over tp)."""
    tp_splittable = True

    def __init__(self, dim, eps=1e-6, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.mean_square = mean_square

    def init_constants(self):
        self.weight.fill_(1.0 - self.offset)

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(self.mean_square(xf) + self.eps)
        return (y * (self.offset + self.learned(self.weight))).to(x.dtype)


class ScaleNorm(_Norm):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.tensor(float(dim) ** 0.5))
        self.dim = dim

    def init_constants(self):
        self.weight.fill_(float(self.dim) ** 0.5)

    def forward(self, x):
        xf = x.float()
        return (self.learned(self.weight) * xf / xf.norm(dim=-1, keepdim=True).clamp_min(self.eps)).to(x.dtype)


class PRMSNorm(_Norm):
    """RMSNorm whose mean square is taken over the first k = ceil(pct * D) features only. (No
    mean_square to split: the first k features of a dimension split over tp live on some ranks only.)"""

    def __init__(self, dim, pct=1.0, eps=1e-6, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.k = max(1, math.ceil(round(pct * dim, 6)))
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def init_constants(self):
        self.weight.fill_(1.0 - self.offset)

    def forward(self, x):  # (..., D) -> (..., D)
        xf = x.float()
        ms = xf[..., :self.k].pow(2).mean(-1, keepdim=True)                     # (..., 1)
        y = xf * torch.rsqrt(ms + self.eps)
        return (y * (self.offset + self.learned(self.weight))).to(x.dtype)


class HyperSphereNorm(_Norm):
    """Projection onto the sphere of radius r: r learned (a (1,) parameter) or a fixed float."""

    def __init__(self, dim, radius: Optional[float] = None, learned=True, eps=1e-5):
        super().__init__()
        self.eps, self.r0 = eps, float(radius) if radius is not None else float(dim) ** 0.5
        self.radius = nn.Parameter(torch.full((1,), self.r0)) if learned else self.r0

    def init_constants(self):
        if isinstance(self.radius, nn.Parameter):
            self.radius.fill_(self.r0)

    def forward(self, x):  # (..., D) -> (..., D)
        xf = x.float()
        r = self.learned(self.radius) if isinstance(self.radius, nn.Parameter) else self.r0
        return (r * xf / xf.norm(dim=-1, keepdim=True).clamp_min(self.eps)).to(x.dtype)


class DyT(_Norm):
    """Dynamic Tanh: an element-wise stand-in for a norm (no statistic over features or tokens)."""

    def __init__(self, dim, alpha_init=0.5):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))           # gamma
        self.bias = nn.Parameter(torch.zeros(dim))            # beta

    def init_constants(self):
        self.alpha.fill_(self.alpha_init)
        self.weight.fill_(1.0)
        self.bias.zero_()

    def forward(self, x):  # (..., D) -> (..., D)
        y = self.learned(self.weight) * torch.tanh(self.learned(self.alpha) * x.float()) + self.learned(self.bias)
        return y.to(x.dtype)


class IdentityNorm(_Norm):
    tp_splittable = True        # nothing to split

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
    """A norm of kind `kind` (default model.norm) over `dim` features (default d_model); `grad_group`:
    its gradients summed over that group (forge.parallel.norms.sum_grads_over)."""
    return sum_grads_over(NORM[kind or cfg.norm](dim or cfg.d_model, cfg), grad_group)


def build_split_norm(cfg, local_dim: int, group, kind: Optional[str] = None, key: str = "model.norm",
                     what: str = "this norm") -> nn.Module:
    """A norm of kind `kind` over local_dim * tp features of which this rank holds local_dim (heads or
    hidden features split over the tp `group`; forge.parallel.norms.split_over): RMSNorm's mean square
    is all-reduced, its weight this rank's shard. Other kinds with tp > 1: ValueError naming `key`."""
    return split_over(build_norm(cfg, local_dim, kind=kind), group, local_dim, key, kind or cfg.norm, what)
