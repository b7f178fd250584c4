"""Normalisations (registry NORM), each mapping (..., D) -> (..., D).

layernorm:          y = (x - mean) / sqrt(var + eps) * w + b        (bias optional)
nonparam_layernorm: y = (x - mean) / sqrt(var + eps)                (OLMo: no weight, no bias)
rmsnorm:            y = x / sqrt(mean(x^2) + eps) * (offset + w)     (Gemma: offset 1, w init 0)
scalenorm:          y = g * x / max(||x||, eps)                      (one learned scalar g)
Statistics are computed in fp32 and the result cast back to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-5, bias=True, affine=True):
        super().__init__()
        self.eps, self.dim = eps, dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.float())).to(x.dtype)


class ScaleNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x):
        xf = x.float()
        return (self.weight.float() * xf / xf.norm(dim=-1, keepdim=True).clamp_min(self.eps)).to(x.dtype)


NORM = {
    "layernorm": lambda dim, cfg: LayerNorm(dim, cfg.norm_eps, bias=cfg.norm_bias),
    "nonparam_layernorm": lambda dim, cfg: LayerNorm(dim, cfg.norm_eps, affine=False),
    "rmsnorm": lambda dim, cfg: RMSNorm(dim, cfg.norm_eps, cfg.norm_offset),
    "scalenorm": lambda dim, cfg: ScaleNorm(dim, cfg.norm_eps),
}


def build_norm(cfg, dim=None) -> nn.Module:
    return NORM[cfg.norm](dim or cfg.d_model, cfg)
