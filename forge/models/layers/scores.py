"""Attention score functions (registry SCORE, keyed by model.attention_softmax): the map from the
scores s_ij = scale * q_i . k_j (soft-capped, plus any position bias) of one query to the weights
of its values, o_i = sum_j p_ij v_j. Only the keys j that query i may see (causal, sliding,
local windows; the cached keys under decoding) take part; a masked key gets p_ij = 0 exactly.

    softmax:      p = e^s / sum_j e^s                     (the default: SDPA, never through here)
    softermax:    p = 2^s / sum_j 2^s
    strongermax:  p = b^(s/t) / sum_j b^(s/t)              b = strongermax_base, t = strongermax_temperature
    consmax:      p = e^(s - beta) / gamma                 beta, gamma learned: one pair per head
                                                           (consmax_per_head) or one per layer
    sigmoid:      p = sigmoid(s - log n)                   (Ramapuram et al. 2024, b = -log n)
    polymax:      p = f(s) / d,  f = 0 for s < x0; y0 (s - x0) / (-x0) for x0 <= s <= 0; s^m + y0 for s > 0
                                 (x0, y0, m = polymax_x_intercept, polymax_y_intercept, polymax_power)
    relumax:      p = relu(s) / d
    relu2max:     p = relu(s)^2 / d
    softplus:     p = log(1 + e^s) / d
    squareplus:   p = (s + sqrt(s^2 + b)) / 2 / d          b = squareplus_b (4 ln^2 2: squareplus(0) = ln 2)
with n = the number of keys query i sees (i + 1 under a causal mask, at most the window under a
sliding window; the same whether the keys come from a cache or not, so decoding equals
recomputation) and d = n, or model.attention_divisor when set (ReaLLM-Forge's constant divisors,
256 for most, 1000 for polymax; its div_by_seq_len divides by the whole length T, which makes
every output depend on how many tokens follow: here n counts only visible keys).

Masking: the functions are evaluated on scores whose masked entries were replaced by a finite
value and the result is then selected by the mask (torch.where), so neither a masked value nor
its gradient reaches anything (an -inf fill would give NaN gradients in squareplus and consmax).
Normalised functions (softermax, strongermax) are softmaxes of rescaled scores,
b^(s/t) / sum b^(s/t) = softmax(s ln(b) / t), with the masked entries at -inf.

Attention sinks (model.attention_sinks, gpt-oss): with softmax, a learned logit z_h per head joins
each query's normalisation and carries no value, p_ij = e^s_ij / (e^z_h + sum_j' e^s_ij'): a softmax
over [s_i., z_h] whose last column is dropped (`sink_softmax`), so a query's weights sum to < 1.
The logits (Sinks, (n_heads/tp,) per rank) are split over tensor-parallel ranks with the heads.

Parameters: consmax's per-head (beta, gamma) have shape (n_heads/tp,) on each tensor-parallel
rank, split like the heads (partition_dim 0); per-layer ones are replicated and their gradients
summed over tp (copy_to).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.parallel.layers import _mark
from forge.parallel.mappings import copy_to


def _visible(allowed):
    """(Tq, 1) number of keys each query sees, as float."""
    return allowed.sum(-1, keepdim=True).to(torch.float32)


def _pointwise(f, s, allowed, divisor):
    """f(s) / d on the visible keys, exactly 0 on the others (see the module docstring)."""
    safe = s.masked_fill(~allowed, 0.0)
    d = _visible(allowed) if divisor is None else divisor
    return torch.where(allowed, f(safe) / d, 0.0)


class Softmax(nn.Module):
    """e^s / sum e^s, explicitly (the attention itself uses SDPA for it; this one is for tests)."""

    def __init__(self, cfg, n_heads, tp_group=None):
        super().__init__()

    def forward(self, s, allowed):            # s (B, H, Tq, Tk), allowed (Tq, Tk) -> (B, H, Tq, Tk)
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)


class Strongermax(nn.Module):
    """b^(s/t) / sum b^(s/t); softermax is b = 2, t = 1."""

    def __init__(self, cfg, n_heads, tp_group=None, base=None, temperature=None):
        super().__init__()
        base = cfg.strongermax_base if base is None else base
        temperature = cfg.strongermax_temperature if temperature is None else temperature
        self.factor = math.log(base) / temperature

    def forward(self, s, allowed):
        return torch.softmax((s * self.factor).masked_fill(~allowed, float("-inf")), dim=-1)


class ConSmax(nn.Module):
    """e^(s - beta) / gamma with learned beta, gamma: (n_heads,) per head or (1,) per layer."""

    def __init__(self, cfg, n_heads, tp_group=None):
        super().__init__()
        self.per_head, self.tp_group = cfg.consmax_per_head, tp_group
        self.init = (cfg.consmax_beta, cfg.consmax_gamma)
        n = n_heads if self.per_head else 1
        self.beta = nn.Parameter(torch.full((n,), self.init[0]))
        self.gamma = nn.Parameter(torch.full((n,), self.init[1]))
        if self.per_head:                       # this rank's heads: split with them
            _mark(self.beta, 0, tp_group)
            _mark(self.gamma, 0, tp_group)

    def init_constants(self):
        self.beta.fill_(self.init[0])
        self.gamma.fill_(self.init[1])

    def forward(self, s, allowed):
        beta, gamma = self.beta, self.gamma
        if not self.per_head:                   # replicated: partial gradients summed over tp
            beta, gamma = copy_to(beta, self.tp_group), copy_to(gamma, self.tp_group)
        beta, gamma = beta.float().view(1, -1, 1, 1), gamma.float().view(1, -1, 1, 1)
        safe = s.masked_fill(~allowed, 0.0)
        return torch.where(allowed, torch.exp(safe - beta) / gamma, 0.0)


class Sigmoid(nn.Module):
    """sigmoid(s - log n), n = visible keys."""

    def __init__(self, cfg, n_heads, tp_group=None):
        super().__init__()

    def forward(self, s, allowed):
        safe = s.masked_fill(~allowed, 0.0)
        return torch.where(allowed, torch.sigmoid(safe - torch.log(_visible(allowed))), 0.0)


def _polymax(x0, y0, m):
    def f(s):
        linear = y0 * (s - x0) / (-x0)
        poly = s.clamp_min(0.0) ** m + y0
        return torch.where(s > 0, poly, torch.where(s >= x0, linear, 0.0))
    return f


class Pointwise(nn.Module):
    """f(s) / d for a fixed f (relumax, relu2max, softplus, squareplus, polymax)."""
    FUNCTIONS = {
        "relumax": lambda cfg: torch.relu,
        "relu2max": lambda cfg: lambda s: torch.relu(s).square(),
        "softplus": lambda cfg: F.softplus,
        "squareplus": lambda cfg: lambda s: 0.5 * (s + torch.sqrt(s * s + cfg.squareplus_b)),
        "polymax": lambda cfg: _polymax(cfg.polymax_x_intercept, cfg.polymax_y_intercept, cfg.polymax_power),
    }

    def __init__(self, name, cfg, n_heads, tp_group=None):
        super().__init__()
        self.f, self.divisor = self.FUNCTIONS[name](cfg), cfg.attention_divisor

    def forward(self, s, allowed):
        return _pointwise(self.f, s, allowed, self.divisor)


class Sinks(nn.Module):
    """The sink logits z_h of this rank's heads: weight (n_heads/tp,), split with the heads, initialised 0."""

    def __init__(self, n_heads, tp_group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_heads))
        _mark(self.weight, 0, tp_group)

    def init_constants(self):
        self.weight.zero_()


def sink_softmax(s, allowed, sinks):
    """softmax over [s_i., z_h] with the sink's column dropped: s (B, H, Tq, Tk), allowed (Tq, Tk),
    sinks (H,) -> (B, H, Tq, Tk), 0 where masked."""
    s = s.masked_fill(~allowed, float("-inf"))
    z = sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)               # (B, H, Tq, 1)
    return torch.softmax(torch.cat([s, z], dim=-1), dim=-1)[..., :-1]


def _pointwise_entry(name):
    return lambda cfg, n_heads, tp_group=None: Pointwise(name, cfg, n_heads, tp_group)


SCORE = {
    "softmax": Softmax,              # Attention takes SDPA's fused softmax instead
    "softermax": lambda cfg, n_heads, tp_group=None: Strongermax(cfg, n_heads, tp_group, 2.0, 1.0),
    "strongermax": Strongermax,
    "consmax": ConSmax,
    "sigmoid": Sigmoid,
    **{name: _pointwise_entry(name) for name in Pointwise.FUNCTIONS},
}
