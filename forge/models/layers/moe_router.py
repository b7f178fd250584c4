"""Mixture-of-experts router and its auxiliary losses (all in fp32).

    logits = x W_r^T (+ b_r with moe.router_bias)     (N, E), x cast to fp32
    scores = softmax(logits)  |  sigmoid(logits)      (router = softmax | sigmoid)
    chosen = top-k(scores + b)                        b: aux-loss-free bias (DeepSeek-V3), selection only
             group-limited (moe.n_group > 1, DeepSeek-V3): the E experts form n_group equal groups of
             consecutive ids, a group scores the sum of its 2 best (scores + b), and the top-k is taken
             among the experts of the best moe.topk_group groups only
    weights = scores[chosen]  (/ their sum when renormalize) * moe.routed_scaling_factor
The router is replicated and sees all E experts on every rank, so the routing (groups included)
is the same whatever the expert-parallel layout.

Auxiliary losses (values are recorded without their coefficients; the coefficients scale the
gradient that `attach_aux_loss` injects):
    load balancing (Switch / GShard):  aux = E * sum_e f_e P_e
        f_e = share of the N*k assignments (before any drop) routed to e, counted over the tokens
              of the whole expert-parallel group (a no-grad all-gather; equal to the global share
              when ep spans the data-parallel axis), P_e = mean over this rank's tokens of the
              token's probability of e (sigmoid router: its scores normalised to sum 1).
        = 1 for a uniform routing, E at worst.
    router z-loss (ST-MoE):            z = mean_tokens logsumexp(logits)^2

`attach_aux_loss(y, loss, scale)` returns y unchanged; its backward also backpropagates `loss` with
gradient `scale` (the MoE layer's, forge.models.layers.moe.set_aux_loss_scale), so the auxiliary losses reach the parameters through
the ordinary backward of the main loss, also across pipeline stages (the trainer never adds
them). Set the scale to whatever the trainer multiplies the main loss by before backward
(1 / gradient-accumulation steps, times the fp16 loss scale): Megatron's MoEAuxLossAutoScaler idea.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.mappings import copy_to

class _AttachAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, loss, scale):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        (loss,) = ctx.saved_tensors
        return g, torch.full_like(loss, ctx.scale), None


def attach_aux_loss(y: torch.Tensor, loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """y, whose backward also sends gradient `scale` into the scalar `loss`."""
    return _AttachAux.apply(y, loss, float(scale))


def load_balancing_loss(frac: torch.Tensor, prob_mean: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e (f: no-grad shares summing to 1; P: mean router probabilities)."""
    return frac.numel() * (frac * prob_mean).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean()


class Router(nn.Module):
    """Token -> (top-k experts, their weights). The weight (E, D) is a dense (replicated) parameter;
    `expert_bias` (E,) is a persistent buffer, present only when model.moe.bias_update_rate > 0,
    moved by `update_bias` from the loads counted in `load` since the last update."""

    def __init__(self, cfg, ctx: ParallelContext = SINGLE):
        super().__init__()
        moe = cfg.moe
        self.n_experts, self.top_k, self.kind, self.renormalize = moe.n_experts, moe.top_k, moe.router, moe.renormalize
        self.rate = moe.bias_update_rate
        self.n_group, self.topk_group, self.routed_scale = moe.n_group, moe.topk_group, moe.routed_scaling_factor
        # sequence parallel: each tp rank routes its own tokens, so the gradients are summed over tp
        self.grad_group = ctx.tp_group if ctx.sp else None
        self.weight = nn.Parameter(torch.empty(moe.n_experts, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(moe.n_experts)) if moe.router_bias else None
        self.init_buffers()

    def init_buffers(self):
        if self.rate > 0:
            self.register_buffer("expert_bias", torch.zeros(self.n_experts))
            self.register_buffer("load", torch.zeros(self.n_experts), persistent=False)
        else:
            self.expert_bias = self.load = None

    def _apply(self, fn, recurse=True):
        """Keep the bias and the load counts in fp32 when the model is cast (bf16 cannot hold
        counts above 256 exactly, nor small bias steps)."""
        keep = {n: getattr(self, n) for n in ("expert_bias", "load") if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = getattr(self, n)
            if new.dtype != torch.float32 and new.is_floating_point():
                setattr(self, n, old.to(device=new.device, dtype=torch.float32))
        return self

    def forward(self, x):
        """x (N, D) -> logits (N, E) fp32, scores (N, E) fp32, idx (N, k) int64, weights (N, k) fp32."""
        w = copy_to(self.weight, self.grad_group)
        b = None if self.bias is None else copy_to(self.bias, self.grad_group).float()
        logits = F.linear(x.float(), w.float(), b)
        scores = logits.softmax(dim=-1) if self.kind == "softmax" else logits.sigmoid()
        select = scores if self.expert_bias is None else scores + self.expert_bias.float()
        if self.n_group > 1:
            select = self._group_limited(select)
        idx = torch.topk(select, self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.kind == "sigmoid" else 0.0))
        if self.routed_scale != 1.0:
            weights = weights * self.routed_scale
        return logits, scores, idx, weights

    def _group_limited(self, select):
        """(N, E) selection scores -> the same with -inf outside each token's best topk_group groups."""
        N = select.shape[0]
        grouped = select.view(N, self.n_group, -1)                              # (N, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)                   # (N, G)
        best = group_scores.topk(self.topk_group, dim=-1).indices               # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, -1)

    def probs_for_aux(self, scores):
        """Per-token probabilities over experts used by the load-balancing loss."""
        return scores if self.kind == "softmax" else scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    @torch.no_grad()
    def update_bias(self, group=None) -> None:
        """b += rate * sign(mean load - load) over the loads counted since the last call (summed
        over `group`, the data-parallel group, so every replica moves its bias identically)."""
        if self.expert_bias is None:
            return
        load = self.load.clone()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(load, group=group)
        if load.sum() > 0:
            self.expert_bias.add_(self.rate * torch.sign(load.mean() - load))
        self.load.zero_()
