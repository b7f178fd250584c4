"""Transformer block and its residual wiring (registry BLOCK: name -> (norms it owns, forward)).

With A = attention, M = MLP, N* = norms, D(z) = dropout(m z) with m = model.residual_multiplier
(Granite; 1 elsewhere), applied to every branch output (so also by a pipeline's BlockPipe):
    pre_ln:     h = x + D(A(N_a(x)));            y = h + D(M(N_m(h)))                  (GPT-2, Llama)
    post_ln:    h = N_pa(x + D(A(x)));           y = N_pm(h + D(M(h)))                 (original Transformer)
    peri_ln:    h = x + D(N_pa(A(N_a(x))));      y = h + D(N_pm(M(N_m(h))))            (Gemma 2 sandwich)
    norm_after: h = x + D(N_pa(A(x)));           y = h + D(N_pm(M(h)))                 (OLMo 2)
    parallel:   y = x + D(A(N_a(x))) + D(M(N_m(x)))   with N_m = N_a when parallel_shared_norm
                                                                        (GPT-J, PaLM, Phi; NeoX: two norms)
N_a is of kind model.norm_attn, N_m model.norm_mlp, N_pa and N_pm model.norm_post (each None: model.norm).
Block model.steering_layer also owns the learned steering vector v (D,), zero at init: its output is
y + v (so a pipeline stage holding the block holds v; replicated over tp, its gradient summed over
tp under sequence parallelism, where each rank adds it to its own tokens). With
model.steering_datasets = n it owns a table V (n, D) instead, and sample b's output is y_b + V[d_b],
d_b the index of the dataset (of data.paths) that sample came from, passed as `dataset` (B,).

Constructors of model modules take (cfg, layer_idx, ctx) when they depend on the layer (Block,
Attention, MLAttention, Mamba2Mixer), (cfg, ctx) otherwise (MoE, Router, the MLP_REGISTRY classes),
then any sizes (an MLP's d_ff, Experts' n_local and d_ff).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge.models.layers.attention import Attention
from forge.models.layers.mla import MLAttention
from forge.models.layers.mlp import MLP_REGISTRY
from forge.models.layers.norm import build_norm
from forge.models.layers.ssm import Mamba2Mixer
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.mappings import copy_to
from forge.parallel.random import tp_stream


def _pre_ln(b, x, pos, cache):
    h = x + b.drop(b.attn_call(b.attn_norm(x), pos, cache))
    return h + b.drop(b.mlp(b.mlp_norm(h)))


def _post_ln(b, x, pos, cache):
    h = b.post_attn_norm(x + b.drop(b.attn_call(x, pos, cache)))
    return b.post_mlp_norm(h + b.drop(b.mlp(h)))


def _peri_ln(b, x, pos, cache):
    h = x + b.drop(b.post_attn_norm(b.attn_call(b.attn_norm(x), pos, cache)))
    return h + b.drop(b.post_mlp_norm(b.mlp(b.mlp_norm(h))))


def _norm_after(b, x, pos, cache):
    h = x + b.drop(b.post_attn_norm(b.attn_call(x, pos, cache)))
    return h + b.drop(b.post_mlp_norm(b.mlp(h)))


def _parallel(b, x, pos, cache):
    a_in = b.attn_norm(x)
    m_in = a_in if b.mlp_norm is None else b.mlp_norm(x)
    return x + b.drop(b.attn_call(a_in, pos, cache)) + b.drop(b.mlp(m_in))


BLOCK = {
    "pre_ln": (("attn_norm", "mlp_norm"), _pre_ln),
    "post_ln": (("post_attn_norm", "post_mlp_norm"), _post_ln),
    "peri_ln": (("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm"), _peri_ln),
    "norm_after": (("post_attn_norm", "post_mlp_norm"), _norm_after),
    "parallel": (("attn_norm", "mlp_norm"), _parallel),
}


# attention kinds whose whole attention-path module is its own class (own weights, forward and cache);
# every other kind is an Attention (q, k, v projections and a score function from ATTENTION)
MIXER = {"mla": MLAttention, "ssm": Mamba2Mixer}


def build_attention(cfg, layer_idx, ctx: ParallelContext = SINGLE):
    """The attention-path module of layer `layer_idx`: a MIXER class for its kind, else Attention."""
    return MIXER.get(cfg.layer_attention(layer_idx), Attention)(cfg, layer_idx, ctx)


def build_mlp(cfg, layer_idx, ctx: ParallelContext = SINGLE):
    from forge.models.layers.moe import MoE, is_moe_layer
    if is_moe_layer(cfg, layer_idx):
        return MoE(cfg, ctx)
    return MLP_REGISTRY[cfg.mlp](cfg, ctx)


def set_attention_checkpointing(model: nn.Module, on: bool) -> None:
    """Selective activation checkpointing: recompute only the attention of every Block in `model`."""
    for m in model.modules():
        if isinstance(m, Block):
            m.checkpoint_attention = on


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int, ctx: ParallelContext = SINGLE):
        super().__init__()
        tp_group, sequence_parallel = ctx.tp_group, ctx.sp
        norms, self._wiring = BLOCK[cfg.block]
        for name, location in (("attn_norm", "attn"), ("mlp_norm", "mlp"), ("post_attn_norm", "post"),
                               ("post_mlp_norm", "post")):
            shared = name == "mlp_norm" and cfg.block == "parallel" and cfg.parallel_shared_norm
            # under sequence parallelism a norm sees T/tp tokens: its gradients are summed over tp
            norm = build_norm(cfg, grad_group=tp_group if sequence_parallel else None, kind=cfg.norm_at(location))
            setattr(self, name, norm if name in norms and not shared else None)
        self.attn = build_attention(cfg, layer_idx, ctx)   # Attention, or a MIXER class (mla, ssm)
        self.mlp = build_mlp(cfg, layer_idx, ctx)
        self.dropout, self.sequence_parallel = cfg.dropout, sequence_parallel
        self.residual_multiplier = cfg.residual_multiplier
        self.checkpoint_attention = False   # selective activation checkpointing (attention only)
        # model.steering_datasets = n > 0: one vector per dataset, V (n, D); else one v (D,)
        shape = (cfg.steering_datasets, cfg.d_model) if cfg.steering_datasets else (cfg.d_model,)
        self.steering = nn.Parameter(torch.empty(shape)) if cfg.steering_layer == layer_idx else None
        self.tp_group = tp_group

    def init_constants(self):
        if self.steering is not None:
            self.steering.zero_()

    def drop(self, x):  # a branch output z -> dropout(m z)
        if self.residual_multiplier != 1.0:
            x = x * self.residual_multiplier
        if not (self.dropout and self.training):
            return x
        if self.sequence_parallel:            # this rank's tokens: an independent mask per tp rank
            with tp_stream.fork(x.device):
                return F.dropout(x, self.dropout, True)
        return F.dropout(x, self.dropout, True)

    def attn_call(self, x, pos, cache):
        if self.checkpoint_attention and self.training and cache is None:
            return checkpoint(self.attn, x, pos, None, use_reentrant=False)
        return self.attn(x, pos, cache)

    def forward(self, x, pos, cache=None, dataset=None):  # (B, T, D) -> (B, T, D)
        """dataset (B,): each sample's dataset index, which picks its row of a per-dataset steering
        table V (n, D); None adds no row (a table's block then steers nothing)."""
        y = self._wiring(self, x, pos, cache)
        if self.steering is None or (self.steering.dim() == 2 and dataset is None):
            return y
        v = copy_to(self.steering, self.tp_group) if self.sequence_parallel else self.steering
        if v.dim() == 2:
            v = v[dataset].unsqueeze(1)                                      # (n, D) -> (B, 1, D)
        return y + v.to(y.dtype)
