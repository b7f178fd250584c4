"""Feed-forward layers (registry MLP) and activations (registry ACTIVATION).

With h = x W_in + b_up (d -> F), act the ACTIVATION entry, and the down biases b_down:
mlp:       y = act(h) W_out + b_down                    (GPT-2, NeoX, Phi: gelu; squared ReLU: relu2)
glu:       y = (act(x W_gate + b_up) * (x W_up + b_up)) W_out + b_down
           with model.glu_limit c (gpt-oss): gate -> min(gate, c), up -> clamp(up, -c, c), and
           model.glu_up_offset o: act(gate) * (up + o)   (gpt-oss: act=quick_gelu, c = 7, o = 1)
                                                        (SwiGLU: act=silu; GeGLU: act=gelu/gelu_tanh)
dual_path: y = act(h) W_out1 - act(-h) W_out2 + b_out1 + b_out2   (ReaLLM-Forge's DualPathMLP with zero
           offsets: one up projection, a path through act and a mirrored path through -act(-h),
           each with its own down projection; = MLP(W_in, W_out1) + MLP(-W_in, -W_out2))
kan:       y = K_2(K_1(x)), two Kolmogorov-Arnold layers d -> F -> d, where
           K(x)_j = sum_i sum_{k=0..K} c_{j,i,k} T_k(tanh(x_i)) + b_j
           (T_k Chebyshev polynomials, K = model.kan_degree; per token, so causal)
identity:  y = 0                                        (the block's MLP branch contributes nothing)
Biases: model.mlp_up_bias on the input projections, model.mlp_down_bias on the output ones.
Sub-norm (model.mlp_sub_norm, mlp and glu; BitNet b1.58's ffn_sub_norm): the down projection reads
N(act(h)) / N(act(g) * u), a norm over the d_ff hidden features (all-reduced mean square under tp).

Tensor parallelism: W_in / W_gate / W_up are column-parallel and W_out* row-parallel, so a gated pair
stays on the same rank: rank i holds columns i of both gate and up. KAN is held as two linear maps
over the basis phi(x) = [T_0(tanh x_1) .. T_K(tanh x_1), T_0(tanh x_2) ..] (n (K+1) features, i-major):
K_1's coefficients (F, d (K+1)) are split by output rows j (column-parallel: rank r computes its
F/tp hidden features from the whole x), K_2's (d, F (K+1)) by input columns (row-parallel: rank r
expands its own hidden features, whose basis is the r-th contiguous chunk of phi(h), and the
partial sums over i are all-reduced).

Activations are modules built by ACTIVATION[key](group): the fixed ones wrap a torch function;
prelu holds one learned slope (replicated: it enters through `copy_to`, so the partial gradients
of ranks that see different hidden features are summed).

Quantisation-aware training (model.quant): every projection's weight is fake-quantised inside the
parallel linears; act_points mlp_in quantises the input of the up/gate projections (the basis
phi(x) for KAN) and mlp_hidden the input of each down projection (act(h), act(g) * u, -act(-h),
phi(h)), whose per-token scale is reduced over tp (the hidden features are split).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.models.layers.norm import build_split_norm
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp_region
from forge.parallel.mappings import copy_to, group_size
from forge.parallel.quant import act_quant


def _q(fq, x):
    return fq(x) if fq is not None else x


def _act_points(mod, cfg, tp_group):
    mod.in_quant, mod.hidden_quant = act_quant(cfg.quant, "mlp_in"), act_quant(cfg.quant, "mlp_hidden", tp_group)


def _sub_norm(mod, cfg, d_ff, tp_group):
    """model.mlp_sub_norm: a norm over the d_ff hidden features (d_ff / tp on this rank), or None."""
    mod.sub_norm = (build_split_norm(cfg, d_ff // group_size(tp_group), tp_group, cfg.mlp_sub_norm,
                                     "model.mlp_sub_norm") if cfg.mlp_sub_norm else None)


def _hidden(mod, h):
    """The down projection's input: h -> N_sub(h) (model.mlp_sub_norm), then mlp_hidden's quantisation."""
    return _q(mod.hidden_quant, mod.sub_norm(h) if mod.sub_norm is not None else h)


class Act(nn.Module):
    """A fixed activation y = fn(x)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class PReLU(nn.Module):
    """y = max(0, x) + a min(0, x), one learned slope a (init 0.25, torch.nn.PReLU's) for all features."""

    INIT = 0.25

    def __init__(self, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), self.INIT))
        self.group = group

    def init_constants(self):
        self.weight.fill_(self.INIT)

    def forward(self, x):
        return F.prelu(x, copy_to(self.weight, self.group).to(x.dtype))


def _fixed(fn):
    return lambda group=None: Act(fn)


ACTIVATION = {
    "celu": _fixed(F.celu),
    "elu": _fixed(F.elu),
    "gelu": _fixed(F.gelu),
    "gelu_tanh": _fixed(lambda x: F.gelu(x, approximate="tanh")),
    "identity": _fixed(lambda x: x),
    "leaky_relu": _fixed(F.leaky_relu),                 # negative slope 0.01
    "mish": _fixed(F.mish),
    "prelu": PReLU,
    "quick_gelu": _fixed(lambda x: x * torch.sigmoid(1.702 * x)),   # gpt-oss's glu, CLIP's QuickGELU
    "relu": _fixed(F.relu),
    "relu2": _fixed(lambda x: F.relu(x).square()),      # squared ReLU (Primer)
    "relu6": _fixed(F.relu6),
    "selu": _fixed(F.selu),
    "sigmoid": _fixed(torch.sigmoid),
    "silu": _fixed(F.silu),
    "softplus": _fixed(F.softplus),
    "softsign": _fixed(F.softsign),
    "tanh": _fixed(torch.tanh),
}


def glu_product(act, gate, up, limit=None, offset=0.0):
    """act(gate) * (up + offset), gate clamped to <= limit and up to [-limit, limit] when limit is set."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return act(gate) * (up + offset if offset else up)


def build_activation(cfg, group=None) -> nn.Module:
    return ACTIVATION[cfg.activation](group)


def activation_is_learned(key: str) -> bool:
    with torch.device("meta"):
        return any(True for _ in ACTIVATION[key]().parameters())


class MLP(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE, d_ff=None):
        super().__init__()
        tp_group, sequence_parallel = ctx.tp_group, ctx.sp
        d_ff = d_ff or cfg.d_ff
        self.act = build_activation(cfg, tp_group)
        self.w_in = ColumnParallelLinear(cfg.d_model, d_ff, cfg.up_bias, tp_group, sequence_parallel=sequence_parallel,
                                         quant=cfg.quant)
        self.w_out = RowParallelLinear(d_ff, cfg.d_model, cfg.down_bias, tp_group, sequence_parallel=sequence_parallel,
                                       residual_output=True, quant=cfg.quant)
        _act_points(self, cfg, tp_group)
        _sub_norm(self, cfg, d_ff, tp_group)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        return self.w_out(_hidden(self, self.act(self.w_in(_q(self.in_quant, x)))))       # (B, T, F/tp) inside


class GLU(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE, d_ff=None):
        super().__init__()
        tp_group, sequence_parallel = ctx.tp_group, ctx.sp
        d_ff = d_ff or cfg.d_ff
        self.act = build_activation(cfg, tp_group)
        col = dict(group=tp_group, sequence_parallel=sequence_parallel, input_ready=True, quant=cfg.quant)
        self.w_gate = ColumnParallelLinear(cfg.d_model, d_ff, cfg.up_bias, **col)
        self.w_up = ColumnParallelLinear(cfg.d_model, d_ff, cfg.up_bias, **col)
        self.w_out = RowParallelLinear(d_ff, cfg.d_model, cfg.down_bias, tp_group, sequence_parallel=sequence_parallel,
                                       residual_output=True, quant=cfg.quant)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.limit, self.offset = cfg.glu_limit, cfg.glu_up_offset
        _act_points(self, cfg, tp_group)
        _sub_norm(self, cfg, d_ff, tp_group)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        x = enter_tp_region(x, self.tp_group, self.sequence_parallel)     # one input-gradient reduction
        x = _q(self.in_quant, x)
        return self.w_out(_hidden(self, glu_product(self.act, self.w_gate(x), self.w_up(x), self.limit,
                                                    self.offset)))                            # (B, T, F/tp) inside


class DualPathMLP(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE, d_ff=None):
        super().__init__()
        tp_group, sp = ctx.tp_group, ctx.sp
        d_ff = d_ff or cfg.d_ff
        self.act = build_activation(cfg, tp_group)
        self.w_in = ColumnParallelLinear(cfg.d_model, d_ff, cfg.up_bias, tp_group, sequence_parallel=sp,
                                         quant=cfg.quant)
        row = dict(group=tp_group, sequence_parallel=sp, residual_output=True, quant=cfg.quant)
        self.w_out1 = RowParallelLinear(d_ff, cfg.d_model, cfg.down_bias, **row)
        self.w_out2 = RowParallelLinear(d_ff, cfg.d_model, cfg.down_bias, **row)
        _act_points(self, cfg, tp_group)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        h = self.w_in(_q(self.in_quant, x))                              # (B, T, F/tp)
        return self.w_out1(_q(self.hidden_quant, self.act(h))) + self.w_out2(_q(self.hidden_quant, -self.act(-h)))


def chebyshev_basis(x, degree: int):
    """(..., n) -> (..., n (degree + 1)): [T_0(t_i), ..., T_degree(t_i)] for each i in turn, t = tanh(x),
    T_0 = 1, T_1 = t, T_{k+1} = 2 t T_k - T_{k-1}."""
    t = torch.tanh(x)
    basis = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        basis.append(2 * t * basis[-1] - basis[-2])
    return torch.stack(basis[:degree + 1], dim=-1).flatten(-2)


class KAN(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE, d_ff=None):
        super().__init__()
        tp_group, sp = ctx.tp_group, ctx.sp
        d_ff, self.degree = d_ff or cfg.d_ff, cfg.kan_degree
        n = cfg.kan_degree + 1
        self.w_in = ColumnParallelLinear(cfg.d_model * n, d_ff, cfg.up_bias, tp_group, sequence_parallel=sp,
                                         input_ready=True, quant=cfg.quant)   # c_{j,i,k} at [j, i n + k]
        self.w_out = RowParallelLinear(d_ff * n, cfg.d_model, cfg.down_bias, tp_group, sequence_parallel=sp,
                                       residual_output=True, quant=cfg.quant)
        self.tp_group, self.sequence_parallel = tp_group, sp
        _act_points(self, cfg, tp_group)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        x = enter_tp_region(x, self.tp_group, self.sequence_parallel)     # (B, T, D)
        h = self.w_in(_q(self.in_quant, chebyshev_basis(x, self.degree)))  # (B, T, D n) -> (B, T, F/tp)
        return self.w_out(_q(self.hidden_quant, chebyshev_basis(h, self.degree)))  # (B, T, F/tp n) -> (B, T, D)


class IdentityMLP(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE, d_ff=None):
        super().__init__()

    def forward(self, x):  # (B, T, D) -> zeros (B, T, D)
        return torch.zeros_like(x)


MLP_REGISTRY = {"mlp": MLP, "glu": GLU, "dual_path": DualPathMLP, "kan": KAN, "identity": IdentityMLP}
