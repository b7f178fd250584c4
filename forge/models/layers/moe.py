"""Mixture-of-experts MLP (model.moe.*), with expert parallelism over `ep_group`.

    y = sum_{e in top-k(x)} w_e(x) E_e(x)  [+ g(x) S(x)]        (B, T, D) -> (B, T, D)

E_e: routed experts, each an MLP of model.mlp's kind (mlp | glu, model.activation, model.mlp_up/down_bias)
with hidden size moe.d_ff (default model d_ff); S: the shared experts (moe.n_shared_experts of
hidden moe.shared_d_ff, held as one MLP of hidden n_shared * shared_d_ff, which computes their sum),
always active, optionally gated by g = sigmoid(x W_g) (moe.shared_gate, Qwen2-MoE). Routing:
moe_router.py; dispatch (dropless or capacity, all-to-all): moe_dispatch.py. MoE layers are those
with i >= moe.first_dense and (i - moe.first_dense) % moe.every == 0 (`is_moe_layer`).

Parameters (names under `layers.{i}.mlp.`), experts stacked along dim 0 (this rank's E/ep):
    router.weight                       (E, D)       dense
    router.bias                         (E,)         dense, only with moe.router_bias (gpt-oss)
    router.expert_bias                  (E,)         buffer, only with moe.bias_update_rate > 0
    experts.w_gate.weight, w_up.weight  (E/ep, F, D) glu        experts.w_in.weight (E/ep, F, D) mlp
    experts.w_out.weight                (E/ep, D, F)
    experts.*.bias                      (E/ep, F) / (E/ep, D) with model.mlp_up_bias / mlp_down_bias
    shared.*                            the usual MLP / GLU module         dense
    shared_gate.weight                  (1, D)       dense
Expert parameters carry `expert = True` (dim 0 is the expert dim, split over ep; the engine
translates it into DeepSpeed's attributes, forge.deepspeed_compat.tag_parameters). When ep > 1
their gradients must be SUMMED over the expert-data-parallel group and divided by the full
data-parallel size (what DeepSpeed does), since the all-to-all already brings the gradients of
the whole expert-parallel group's tokens to the expert's rank.

Tensor parallelism (tp > 1): each expert's hidden F is split like a dense MLP (w_gate / w_up /
w_in by rows, w_out by columns; `partition_dim` set), the combine is summed over tp; the router
is replicated. Sequence parallelism: the router runs on this rank's T/tp tokens, the tokens and
routing are gathered over tp for the experts and the output reduce-scattered back; the
auxiliary losses are then divided by tp (each rank's share of the whole sequence's loss).

Training vs eval: capacity dropping applies in training mode only (eval and generation are
dropless, as the Hugging Face models are). Metrics and the loads for the bias update are recorded
by training-mode forwards only, once per forward (not again by an activation-checkpointing
recompute in backward).

What a trainer calls:
    set_aux_loss_scale(model, s)     s = the factor the main loss is multiplied by before backward
                                     (1/grad_accum; times the loss scale when scaling fp16 losses by hand)
    update_moe_biases(model, dp)     after each optimizer step (aux-loss-free balancing; no-op otherwise)
    moe_metrics(model, group=pp)     at logging time: averages since the last call (then reset),
                                     over the layers of every pipeline stage
    expert_params / shard_experts / gather_experts   expert tensors across the ep group (checkpoints)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.models.layers.mlp import MLP_REGISTRY, build_activation, glu_product
from forge.models.layers.moe_dispatch import capacity_for, dispatch_combine
from forge.models.layers.moe_router import Router, attach_aux_loss, load_balancing_loss, z_loss
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.mappings import (copy_to, gather_seq, group_rank, group_size, reduce_from,
                                     reduce_scatter_seq)

__all__ = ["MoE", "is_moe_layer", "moe_layers", "moe_metrics", "update_moe_biases", "set_aux_loss_scale",
           "expert_params", "shard_experts", "gather_experts"]


def _recomputing() -> bool:
    """True inside backward (an activation-checkpointing recompute): the forward was recorded already."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def is_moe_layer(cfg, i: int) -> bool:
    moe = cfg.moe
    return bool(moe.n_experts) and i >= moe.first_dense and (i - moe.first_dense) % moe.every == 0


def moe_layers(model) -> list["MoE"]:
    return [m for m in model.modules() if isinstance(m, MoE)]


class _Stacked(nn.Module):
    """E linear maps stacked: weight (E, out, in), bias (E, out) (forge.models.init: normal
    weights, drawn per expert; std / sqrt(2 L) when residual_output; zero biases)."""

    def __init__(self, n, out_features, in_features, bias, residual_output=False):
        super().__init__()
        self.residual_output = residual_output
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(n, out_features)) if bias else None


class Experts(nn.Module):
    """This rank's E/ep experts (hidden F/tp each under tensor parallelism)."""

    def __init__(self, cfg, ctx: ParallelContext, n_local: int, d_ff: int):
        super().__init__()
        tp_group = ctx.tp_group
        tp = group_size(tp_group)
        f, d = d_ff // tp, cfg.d_model
        self.glu, self.act, self.tp_group = cfg.mlp == "glu", build_activation(cfg), tp_group
        self.limit, self.offset = cfg.glu_limit, cfg.glu_up_offset
        self.out_bias_here = group_rank(tp_group) == 0        # a row-parallel bias is added once
        names = ("w_gate", "w_up") if self.glu else ("w_in",)
        for name in names:
            setattr(self, name, _Stacked(n_local, f, d, cfg.up_bias))
        self.w_out = _Stacked(n_local, d, f, cfg.down_bias, residual_output=True)
        for name, p in self.named_parameters():
            p.expert = True                       # DeepSpeed's attributes: forge.deepspeed_compat.tag_parameters
            if tp > 1 and not name.startswith("w_out.bias"):
                p.partition_dim = 2 if name.startswith("w_out") else 1

    def forward(self, x, sizes: list[int]):  # (M, D) grouped by local expert -> (M, D), partial over tp
        out_bias = self.w_out.bias
        if out_bias is not None and group_size(self.tp_group) > 1:
            out_bias = copy_to(out_bias, self.tp_group) * (1.0 if self.out_bias_here else 0.0)
        # unbind once (its backward is one stack), not weight[e] per expert (E full-size zero grads)
        first = [self._split(m) for m in ((self.w_gate, self.w_up) if self.glu else (self.w_in,))]
        w_out = self.w_out.weight.unbind(0)
        b_out = None if out_bias is None else out_bias.unbind(0)
        outs = []
        for e, rows in enumerate(x.split(sizes)):
            z = [F.linear(rows, w[e], None if b is None else b[e]) for w, b in first]
            h = glu_product(self.act, z[0], z[1], self.limit, self.offset) if self.glu else self.act(z[0])
            o = F.linear(h, w_out[e])
            outs.append(o if b_out is None else o + b_out[e])
        return torch.cat(outs)

    @staticmethod
    def _split(m):
        return m.weight.unbind(0), None if m.bias is None else m.bias.unbind(0)


class MoE(nn.Module):
    def __init__(self, cfg, ctx: ParallelContext = SINGLE):
        super().__init__()
        moe = cfg.moe
        tp_group, ep_group, ep = ctx.tp_group, ctx.ep_group, ctx.ep
        self.n_experts, self.top_k, self.ep_group, self.tp_group = moe.n_experts, moe.top_k, ep_group, tp_group
        self.n_local, self.ep_rank = moe.n_experts // ep, ctx.ep_rank
        self.sp = ctx.sp
        self.capacity_factor = moe.capacity_factor
        self.aux_coef, self.z_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.aux_scale = 1.0                # gradient of the attached aux losses (set_aux_loss_scale)
        self.router = Router(cfg, ctx)
        self.experts = Experts(cfg, ctx, self.n_local, moe.d_ff)
        self.shared = self.shared_gate = None
        if moe.n_shared_experts:
            d_ff = moe.n_shared_experts * moe.shared_d_ff
            self.shared = MLP_REGISTRY[cfg.mlp](cfg, ctx, d_ff=d_ff)
            if moe.shared_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)
        self._reset_stats()

    # ------------------------------------------------------------------ forward
    def forward(self, x):  # (B, T, D) -> (B, T, D)   ((B, T/tp, D) under sequence parallelism)
        B, T, D = x.shape
        logits, scores, idx, w = self.router(x.reshape(-1, D))
        if self.sp:
            xe = gather_seq(x, self.tp_group)
            idx_e = gather_seq(idx.view(B, T, -1), self.tp_group).reshape(-1, self.top_k)
            w_e = gather_seq(w.view(B, T, -1), self.tp_group).reshape(-1, self.top_k)
        else:
            # experts see x and the weights on every tp rank; their partial gradients are summed
            xe, idx_e, w_e = copy_to(x, self.tp_group), idx, copy_to(w, self.tp_group)
        capacity = None
        if self.capacity_factor is not None and self.training:
            capacity = capacity_for(self.capacity_factor, idx_e.shape[0], self.top_k, self.n_experts)
        y, stats = dispatch_combine(xe.reshape(-1, D), idx_e, w_e.to(x.dtype), self.experts, self.n_experts,
                                    capacity, self.ep_group)
        y = y.view(B, -1, D)
        y = reduce_scatter_seq(y, self.tp_group) if self.sp else reduce_from(y, self.tp_group)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                g = F.linear(x, copy_to(self.shared_gate.weight, self.tp_group if self.sp else None))
                s = torch.sigmoid(g) * s
            y = y + s

        frac = stats.group_counts.float() / stats.group_counts.sum().clamp_min(1)
        track = torch.is_grad_enabled() and self.training and (self.aux_coef or self.z_coef)
        with torch.set_grad_enabled(bool(track)):
            aux = load_balancing_loss(frac, self.router.probs_for_aux(scores).mean(0))
            z = z_loss(logits)
        if track:
            share = group_size(self.tp_group) if self.sp else 1
            y = attach_aux_loss(y, (self.aux_coef * aux + self.z_coef * z) / share, self.aux_scale)
        if self.training and not _recomputing():
            self._record(aux.detach(), z.detach(), stats)
        return y

    # ------------------------------------------------------------------ metrics and bias
    def _reset_stats(self):
        self._n = 0
        self._sums = None          # tensor [aux, z, dropped_frac, load_max_over_mean]
        self._tokens = None        # (E,) group-wide assignments per expert, summed over forwards

    @torch.no_grad()
    def _record(self, aux, z, stats):
        counts = stats.group_counts.float()
        imbalance = counts.max() / counts.mean().clamp_min(1e-9)
        dropped = stats.dropped.float() / max(stats.assignments, 1)
        row = torch.stack([aux.float(), z.float(), dropped, imbalance])
        self._sums = row if self._sums is None else self._sums + row
        self._tokens = counts if self._tokens is None else self._tokens + counts
        self._n += 1
        if self.router.load is not None:
            self.router.load.add_(stats.counts.to(self.router.load.dtype))

    def metrics(self, reset: bool = True) -> dict:
        """Means over the forwards since the last reset (empty when none)."""
        if not self._n:
            return {}
        s = (self._sums / self._n).tolist()
        tokens = self._tokens / self._n
        out = {"aux_loss": s[0], "z_loss": s[1], "dropped_frac": s[2], "load_max_over_mean": s[3],
               "tokens_per_expert_max": tokens.max().item(), "tokens_per_expert_mean": tokens.mean().item()}
        if reset:
            self._reset_stats()
        return out


def moe_metrics(model, reset: bool = True, group=None) -> dict:
    """Averages over MoE layers (and forwards since the last call) of
    moe/aux_loss (E sum f P, 1 = balanced, no coefficient), moe/z_loss, moe/dropped_frac (share of
    this rank's assignments dropped by the capacity), moe/load_max_over_mean (max expert load /
    mean, per forward, over the expert-parallel group), moe/tokens_per_expert_max and _mean.
    `group`: the pipeline group, whose stages hold the other layers; the per-layer values are
    gathered over it (a collective: every rank of the group calls it, MoE layers or not), so
    every stage returns the averages over all the model's MoE layers."""
    per_layer = [m.metrics(reset) for m in moe_layers(model)]
    per_layer = [d for d in per_layer if d]
    if group is not None and group_size(group) > 1:
        import torch.distributed as dist
        stages = [None] * group_size(group)
        dist.all_gather_object(stages, per_layer, group=group)
        per_layer = [d for stage in stages for d in stage]
    if not per_layer:
        return {}
    return {f"moe/{k}": sum(d[k] for d in per_layer) / len(per_layer) for k in per_layer[0]}


@torch.no_grad()
def set_aux_loss_scale(model, scale: float) -> None:
    """The gradient that the auxiliary losses of every MoE layer of `model` receive in backward
    (default 1.0): the factor the main loss gets before backward (forge.models.layers.moe_router)."""
    for m in moe_layers(model):
        m.aux_scale = float(scale)


def update_moe_biases(model, group=None) -> None:
    """Aux-loss-free balancing: call after each optimizer step; `group` = the data-parallel group
    (loads are summed over it so every replica moves its biases identically)."""
    for m in moe_layers(model):
        m.router.update_bias(group)


# ---------------------------------------------------------------- expert parameters under ep
def expert_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if getattr(p, "expert", False)}


def _expert_names(model_or_names) -> set[str]:
    if isinstance(model_or_names, nn.Module):
        return set(expert_params(model_or_names))
    return set(model_or_names)


def shard_experts(full: dict[str, torch.Tensor], model, ep_group) -> dict[str, torch.Tensor]:
    """This rank's slice (dim 0) of every expert tensor of a state dict holding all experts.
    `model`: the model whose expert parameter names key `full`, or those names themselves."""
    ep, rank, experts = group_size(ep_group), group_rank(ep_group), _expert_names(model)
    out = {}
    for name, t in full.items():
        out[name] = t.chunk(ep, dim=0)[rank].clone() if name in experts and ep > 1 else t
    return out


def gather_experts(local: dict[str, torch.Tensor], model, ep_group) -> dict[str, torch.Tensor]:
    """All experts (concatenated over the ep group along dim 0) from every rank's slices.
    `model`: the model whose expert parameter names key `local`, or those names themselves."""
    import torch.distributed as dist
    ep, experts = group_size(ep_group), _expert_names(model)
    out = {}
    for name, t in local.items():
        if name not in experts or ep == 1:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(ep)]
        dist.all_gather(parts, t.contiguous(), group=ep_group)
        out[name] = torch.cat(parts, dim=0)
    return out

