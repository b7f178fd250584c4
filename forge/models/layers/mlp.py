"""Feed-forward layers (registry MLP) and activations (registry ACTIVATION).

mlp: y = act(x W_in + b) W_out + b             (GPT-2, NeoX, Phi: gelu; squared ReLU: relu2)
glu: y = (act(x W_gate) * (x W_up)) W_out      (SwiGLU: act=silu; GeGLU: act=gelu/gelu_tanh)
W_in / W_gate / W_up are column-parallel and W_out row-parallel, so a gated pair stays on the
same rank: rank i holds columns i of both gate and up.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp_region

ACTIVATION = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}


class MLP(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE, d_ff=None):
        super().__init__()
        tp_group, sequence_parallel = ctx.tp_group, ctx.sp
        d_ff = d_ff or cfg.ff_dim
        self.act = ACTIVATION[cfg.activation]
        self.w_in = ColumnParallelLinear(cfg.d_model, d_ff, cfg.mlp_bias, tp_group, sequence_parallel=sequence_parallel)
        self.w_out = RowParallelLinear(d_ff, cfg.d_model, cfg.mlp_bias, tp_group, sequence_parallel=sequence_parallel,
                                       residual_output=True)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        return self.w_out(self.act(self.w_in(x)))


class GLU(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE, d_ff=None):
        super().__init__()
        tp_group, sequence_parallel = ctx.tp_group, ctx.sp
        d_ff = d_ff or cfg.ff_dim
        self.act = ACTIVATION[cfg.activation]
        col = dict(group=tp_group, sequence_parallel=sequence_parallel, input_ready=True)
        self.w_gate = ColumnParallelLinear(cfg.d_model, d_ff, cfg.mlp_bias, **col)
        self.w_up = ColumnParallelLinear(cfg.d_model, d_ff, cfg.mlp_bias, **col)
        self.w_out = RowParallelLinear(d_ff, cfg.d_model, cfg.mlp_bias, tp_group, sequence_parallel=sequence_parallel,
                                       residual_output=True)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        x = enter_tp_region(x, self.tp_group, self.sequence_parallel)     # one input-gradient reduction
        return self.w_out(self.act(self.w_gate(x)) * self.w_up(x))


MLP_REGISTRY = {"mlp": MLP, "glu": GLU}
