"""Multi-head latent attention (attention kind "mla"; DeepSeek-V2, DeepSeek-AI 2024, and DeepSeek-V3).

With x (B, T, D), H heads, n = model.qk_nope_head_dim, r = model.qk_rope_head_dim, d_v = v_head_dim,
c = model.kv_lora_rank, r_q = model.q_lora_rank:
    queries      q = W_qb RMSNorm(W_qa x)   (r_q set)   or   q = W_q x            (B, T, H (n + r))
                 q_h = [q_h^nope (n) | RoPE(q_h^rope) (r)]
    latent       [c_kv | k^rope] = W_kva x                                          (B, T, c + r)
                 c_kv <- RMSNorm(c_kv);  k^rope <- RoPE(k^rope): ONE rotary key shared by all heads
    keys/values  [k_h^nope | v_h] = W_kvb c_kv                                     (B, T, H (n + d_v))
                 k_h = [k_h^nope | k^rope]
    o_h = softmax(scale q_h k_h^T + causal mask) v_h,   y = W_o [o_1 .. o_H]
scale = model.attn_scale, default (n + r)^-0.5. model.qkv_bias puts biases on the down-projections
W_qa and W_kva only (DeepSeek's attention_bias); W_q, W_qb and W_kvb have none. RoPE rotates all r channels (pairs per
model.rope_interleaved; DeepSeek's checkpoints pair (2i, 2i+1)), with model.rope_scaling (YaRN).
The core runs through attention.softmax_attention (SDPA; its explicit path for model.attn_softcap),
with v (or q and k) zero-padded to a common width so that SDPA can take its fused kernels.

KV cache (attention.KVCache): per token and layer only c_kv (B, 1, S, c) and the rotated k^rope
(B, 1, S, r), i.e. c + r numbers whatever H (`mla_cache_numbers`); keys and values are expanded
from the cached latent at every step, so decoding computes what a full recomputation does.

Tensor parallelism: heads are split (W_q or W_qb and W_kvb by output rows, W_o by input columns);
W_qa, W_kva and the two norms are replicated: they act on the replicated input, and their
gradients (partial on each rank: from its own heads) are summed over tp (ReplicatedLinear's
copy_to, the norms' grad_group); the input's gradient is reduced once (enter_tp_region).
Parameters (under layers.{i}.attn.): wq (r_q null) | wq_a, q_norm, wq_b;  wkv_a, kv_norm, wkv_b;  wo.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.models.layers.attention import AttnSpec, KVCache, softmax_attention
from forge.models.layers.norm import build_norm
from forge.models.layers.position import Rotary
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, enter_tp_region
from forge.parallel.quant import act_quant
from forge.parallel.random import tp_stream


def mla_cache_numbers(cfg) -> int:
    """Numbers the KV cache holds per token and MLA layer: the latent and the rotary key, c + r."""
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


class MLAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int, ctx: ParallelContext = SINGLE):
        super().__init__()
        tp_group, sequence_parallel, tp = ctx.tp_group, ctx.sp, ctx.tp
        self.layer_idx, self.kind = layer_idx, "mla"
        self.n, self.r, self.c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        self.vd, self.n_heads = cfg.v_head_dim, cfg.n_heads // tp                 # local heads
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else (self.n + self.r) ** -0.5
        self.softcap, self.attn_dropout = cfg.attn_softcap, cfg.attn_dropout
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        sp = dict(group=tp_group, sequence_parallel=sequence_parallel, input_ready=True, quant=cfg.quant)
        H, qk = cfg.n_heads, self.n + self.r
        self.wq = self.wq_a = self.q_norm = self.wq_b = None
        if cfg.q_lora_rank is None:
            self.wq = ColumnParallelLinear(cfg.d_model, H * qk, False, **sp)
        else:
            self.wq_a = ReplicatedLinear(cfg.d_model, cfg.q_lora_rank, cfg.qkv_bias, **sp)
            self.q_norm = build_norm(cfg, cfg.q_lora_rank, grad_group=tp_group, kind="rmsnorm")
            self.wq_b = ColumnParallelLinear(cfg.q_lora_rank, H * qk, False, **sp)
        self.wkv_a = ReplicatedLinear(cfg.d_model, self.c + self.r, cfg.qkv_bias, **sp)
        self.kv_norm = build_norm(cfg, self.c, grad_group=tp_group, kind="rmsnorm")
        self.wkv_b = ColumnParallelLinear(self.c, H * (self.n + self.vd), False, **sp)
        self.wo = RowParallelLinear(H * self.vd, cfg.d_model, cfg.attn_out_bias, group=tp_group,
                                    sequence_parallel=sequence_parallel, residual_output=True, quant=cfg.quant)
        self.in_quant, self.o_quant = act_quant(cfg.quant, "qkv_in"), act_quant(cfg.quant, "o_in", tp_group)
        # the rotary part alone: r channels, all rotated (model.rope_scaling applies, YaRN's on r dims)
        rope_cfg = dataclasses.replace(cfg, head_dim=self.r, qk_head_dim=self.r, rotary_pct=1.0)
        self.pos = Rotary(rope_cfg) if cfg.layer_position(layer_idx) == "rope" else None

    def forward(self, x, pos, cache: KVCache | None = None):
        """x (B, T, D) ((B, T/tp, D) under sequence parallelism), pos (T,) -> (B, T, D)."""
        x = enter_tp_region(x, self.tp_group, self.sequence_parallel)        # (B, T, D), gradient reduced once
        if self.in_quant is not None:
            x = self.in_quant(x)
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))   # (B, T, H*(n+r))
        B, T = q.shape[:2]
        q_nope, q_rope = q.view(B, T, self.n_heads, self.n + self.r).transpose(1, 2).split([self.n, self.r], -1)
        latent, k_rope = self.wkv_a(x).split([self.c, self.r], dim=-1)      # (B, T, c), (B, T, r)
        latent, k_rope = self.kv_norm(latent).unsqueeze(1), k_rope.unsqueeze(1)   # (B, 1, T, c), (B, 1, T, r)
        if self.pos is not None:
            q_rope, k_rope = self.pos(q_rope, k_rope, pos)                     # (B, H, T, r), (B, 1, T, r)
        kpos = pos
        if cache is not None:                  # the cache holds the latent and the rotary key only
            latent, k_rope = cache.update(self.layer_idx, latent, k_rope)     # (B, 1, S, c), (B, 1, S, r)
            kpos = torch.arange(latent.shape[2], device=x.device)
        S = latent.shape[2]
        kv = self.wkv_b(latent.squeeze(1)).view(B, S, self.n_heads, self.n + self.vd).transpose(1, 2)
        k_nope, v = kv.split([self.n, self.vd], dim=-1)                        # (B, H, S, n), (B, H, S, d_v)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)   # (B, H, S, n+r)
        q = torch.cat([q_nope, q_rope], dim=-1)                                # (B, H, T, n+r)
        # equal widths let SDPA use its fused kernels (else it materialises T x S scores): zero channels
        # added to v give outputs that are dropped, added to q and k they add 0 to every score
        pad = self.n + self.r - self.vd
        if pad > 0:
            v = F.pad(v, (0, pad))                                             # (B, H, S, n+r)
        elif pad < 0:
            q, k = F.pad(q, (0, -pad)), F.pad(k, (0, -pad))                    # (B, H, *, d_v)
        with tp_stream.fork(x.device) if self.training and self.attn_dropout else contextlib.nullcontext():
            spec = AttnSpec(kind="causal", scale=self.scale, softcap=self.softcap,
                            dropout=self.attn_dropout if self.training else 0.0)   # SDPA (explicit with softcap)
            o = softmax_attention(q, k, v, pos, kpos, spec)[..., :self.vd]   # (B, H, T, d_v)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.vd)           # (B, T, H*d_v), heads split over tp
        return self.wo(self.o_quant(o) if self.o_quant is not None else o)
