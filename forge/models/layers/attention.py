"""Attention (registry ATTENTION: kind -> function over (q, k, v, positions)).

Softmax kinds compute  softmax(scale * q k^T + bias + mask) v  with the mask
    causal:  j <= i
    sliding: j <= i and i - j < sliding_window             (Mistral, Gemma 2 local layers)
    local:   j <= i and i // local_window == j // local_window   (block-local / chunked)
through PyTorch SDPA (flash / memory-efficient kernels where available), or an explicit fp32
softmax when scores are soft-capped: s -> cap * tanh(s / cap) (Gemma 2).
    linear:  o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i),  S_i = sum_{j<=i} phi(k_j) v_j^T,
             z_i = sum_{j<=i} phi(k_j),  phi = elu + 1   (Katharopoulos et al., 2020), O(T).
    identity: the attention path contributes 0 (ablations); the layer has no attention weights.
Score functions (model.attention_softmax, forge.models.layers.scores): softmax runs through SDPA as
above; any other p(s) is computed explicitly, over chunks of model.attention_chunk queries, each
recomputed in backward (checkpointed), so a head holds O(T * chunk) scores, never T x T.
Attention sinks (model.attention_sinks): a learned logit per head in the softmax's denominator
(scores.sink_softmax), computed on that explicit chunked path (SDPA takes no sink).
Heads: n_heads query heads share n_kv_heads key/value heads (MHA, GQA, MQA); queries and keys have
qk_head_dim channels per head, values v_head_dim (both default head_dim), and wo reads the heads
concatenated, n_heads * v_head_dim (ReaLLM-Forge's "infinite" attention with concatenated heads).
Under tensor parallelism each rank holds n_heads/tp query and n_kv_heads/tp key/value heads.
qk-norm (registry QK_NORM): head = a norm over each head's channels, full = over all heads',
l2_scale = q^ . k^ g with q^ = q / ||q||, k^ = k / ||k|| per head and a learned scalar g initialised
to log2(L^2 - L), L = max_seq_len (Henry et al. 2020, "Query-Key Normalization for Transformers"),
or model.qk_norm_scale; g replaces the 1/sqrt(hd) scale.
Quantisation-aware training (model.quant, forge.parallel.quant): the projections' weights are
fake-quantised inside the parallel linears; the activation points are the input of wq/wk/wv
(qkv_in), the input of wo (o_in, its per-token scale reduced over tp: heads are split), and the
scores s (masked entries set to 0 first) and weights p (scores, probs) of the explicit path, one
scale per query row, before p(s) and before p v. Quantised scores with attention_softmax=softmax
take the explicit path with an explicit softmax instead of SDPA; linear attention has no scores.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge.models.layers.norm import build_norm
from forge.models.layers.position import POSITION, Rotary
from forge.models.layers.scores import SCORE, Sinks, sink_softmax
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, enter_tp_region
from forge.parallel.mappings import copy_to, group_rank, group_size
from forge.parallel.quant import act_quant
from forge.parallel.random import tp_stream


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, Hkv, S, qk_hd) and (B, Hkv, S, v_hd);
    `seen[i]`: tokens layer i has passed (identity layers store no keys but count them)."""

    def __init__(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.seen = [0] * n_layers

    @property
    def length(self) -> int:
        return self.seen[0]

    def update(self, i, k, v):
        self.seen[i] += k.shape[2]
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v

    def advance(self, i, n: int) -> None:
        """Layer i passed n tokens without keys (identity attention)."""
        self.seen[i] += n


def _allowed(kind, qpos, kpos, attn):
    """Boolean (Tq, Tk) mask of the keys each query may attend to."""
    diff = qpos.unsqueeze(-1) - kpos.unsqueeze(0)
    ok = diff >= 0
    if kind == "sliding":
        ok &= diff < attn.sliding_window
    elif kind == "local":
        ok &= (qpos.unsqueeze(-1) // attn.local_window) == (kpos.unsqueeze(0) // attn.local_window)
    return ok


def softmax_attention(kind, q, k, v, qpos, kpos, attn):
    """q (B, H, Tq, hd), k/v (B, Hkv, Tk, hd) -> (B, H, Tq, v_hd)."""
    if attn.score is not None or attn.sinks is not None:
        return scored_attention(kind, q, k, v, qpos, kpos, attn)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    dropout = attn.attn_dropout if attn.training else 0.0
    bias = attn.pos.bias(qpos, kpos) if hasattr(attn.pos, "bias") else None   # (H, Tq, Tk) or None
    plain_causal = kind == "causal" and bias is None and attn.softcap is None
    # `kpos is qpos` (no cache) decides without a host sync, which torch.compile cannot trace
    if plain_causal and q.shape[2] == k.shape[2] and (kpos is qpos or bool(qpos[0] == kpos[0])):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=attn.scale)
    allowed = _allowed(kind, qpos, kpos, attn)                                 # (Tq, Tk)
    if attn.softcap is None:
        mask = allowed if bias is None else bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scale)
    s = (q.float() @ k.float().transpose(-1, -2)) * attn.scale                  # (B, H, Tq, Tk)
    s = attn.softcap * torch.tanh(s / attn.softcap)
    if bias is not None:
        s = s + bias
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
    return F.dropout(p, dropout, attn.training) @ v


def _scored_chunk(kind, attn, q, k, v, qpos, kpos):
    """One chunk of queries: q (B, H, C, hd), k (B, H, Tk, hd), v (B, H, Tk, v_hd) -> (B, H, C, v_hd)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * attn.scale                 # (B, H, C, Tk)
    if attn.softcap is not None:
        s = attn.softcap * torch.tanh(s / attn.softcap)
    if hasattr(attn.pos, "bias"):
        s = s + attn.pos.bias(qpos, kpos)                                       # (H, C, Tk)
    allowed = _allowed(kind, qpos, kpos, attn)
    if getattr(attn, "score_quant", None) is not None:        # masked scores never enter a row's scale
        s = attn.score_quant(s.masked_fill(~allowed, 0.0))
    if attn.sinks is not None:
        p = sink_softmax(s, allowed, attn.sinks.weight)                        # 0 where masked
    else:
        p = attn.score(s, allowed)                                              # 0 where masked
    if getattr(attn, "prob_quant", None) is not None:
        p = attn.prob_quant(p)
    p = F.dropout(p, attn.attn_dropout, attn.training) if attn.training and attn.attn_dropout else p
    return (p @ v.float()).to(v.dtype)


def scored_attention(kind, q, k, v, qpos, kpos, attn):
    """Attention with an explicit score function p(s) (model.attention_softmax, or softmax with
    sinks), chunk by chunk over
    the queries: memory O(chunk * Tk) per head; under autograd each chunk but a lone one is
    checkpointed (its scores are recomputed in backward, dropout masks included)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    C, T = attn.chunk, q.shape[2]
    if T <= C:
        return _scored_chunk(kind, attn, q, k, v, qpos, kpos)
    out = []
    for s in range(0, T, C):
        args = (kind, attn, q[:, :, s:s + C], k, v, qpos[s:s + C], kpos)
        if torch.is_grad_enabled():
            out.append(checkpoint(_scored_chunk, *args, use_reentrant=False))
        else:
            out.append(_scored_chunk(*args))
    return torch.cat(out, dim=2)                                                # (B, H, T, v_hd)


def identity_attention(kind, q, k, v, qpos, kpos, attn):
    """Never called: an identity layer returns 0 before computing q, k, v (Attention.forward)."""
    raise RuntimeError("identity attention computes nothing")


def linear_attention(kind, q, k, v, qpos, kpos, attn, chunk: int = 64):
    """Causal linear attention, chunked: quadratic inside a chunk, a running state across chunks."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k = F.elu(q.float()) + 1, F.elu(k.float()) + 1
    vf = v.float()
    if q.shape[2] != k.shape[2]:            # decoding with a cache: queries see every cached key <= them
        a = (q @ k.transpose(-1, -2)).masked_fill(~_allowed("causal", qpos, kpos, attn), 0.0)
        return ((a @ vf) / a.sum(-1, keepdim=True)).to(v.dtype)
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, d, v.shape[-1])   # sum_j phi(k_j) v_j^T over earlier chunks
    z = q.new_zeros(B, H, d)                # sum_j phi(k_j) over earlier chunks
    out = []
    for s in range(0, T, chunk):
        qc, kc, vc = q[:, :, s:s + chunk], k[:, :, s:s + chunk], vf[:, :, s:s + chunk]
        a = (qc @ kc.transpose(-1, -2)).tril()                                 # (B, H, C, C)
        num = a @ vc + qc @ S
        den = a.sum(-1) + (qc * z.unsqueeze(2)).sum(-1)                       # (B, H, C)
        out.append(num / den.unsqueeze(-1))
        S = S + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(2)
    return torch.cat(out, dim=2).to(v.dtype)


ATTENTION = {
    "causal": softmax_attention,
    "sliding": softmax_attention,
    "local": softmax_attention,
    "linear": linear_attention,
    "identity": identity_attention,
}

# ReaLLM-Forge kinds that are not causal as defined there, with the reason (ConfigError on use)
REFUSED_ATTENTION = {
    "co4": "ReaLLM-Forge's co4 modulates the latent queries, keys and values with their means over "
           "all N tokens and then gives every token the mean of its latent outputs (y repeated over "
           "N), so each position sees future tokens; it has no causal form to train a decoder with",
}


def _qk_head(attn, cfg, tp_group):          # one (hd,) norm shared by heads that live on different ranks
    attn.q_norm = build_norm(cfg, cfg.qk_hd, grad_group=tp_group)
    attn.k_norm = build_norm(cfg, cfg.qk_hd, grad_group=tp_group)


def _qk_full(attn, cfg, tp_group):          # a norm over all heads: weights and statistics split over tp
    attn.q_norm = attn._full_norm(cfg, attn.n_heads, tp_group)
    attn.k_norm = (build_norm(cfg, cfg.kv_heads * cfg.qk_hd, grad_group=tp_group) if attn.kv_replicated
                   else attn._full_norm(cfg, attn.n_kv, tp_group))


class QKScale(nn.Module):
    """The learned scalar g of qk_norm=l2_scale (replicated; gradients summed over tp)."""

    def __init__(self, cfg, tp_group=None):
        super().__init__()
        L = cfg.max_seq_len
        self.init = cfg.qk_norm_scale if cfg.qk_norm_scale is not None else math.log2(L * L - L)
        self.weight = nn.Parameter(torch.full((1,), float(self.init)))   # (1,): DeepSpeed flattens no 0-d tensors
        self.tp_group = tp_group

    def init_constants(self):
        self.weight.fill_(self.init)

    def forward(self, q, k):    # (B, H, T, hd) each -> g q / ||q||, k / ||k||
        g = copy_to(self.weight, self.tp_group)
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return q * g.to(q.dtype), k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _qk_l2_scale(attn, cfg, tp_group):
    attn.qk_scale = QKScale(cfg, tp_group)


QK_NORM = {   # model.qk_norm -> what it adds to an Attention (see the module docstring)
    "none": lambda attn, cfg, tp_group: None,
    "head": _qk_head,
    "full": _qk_full,
    "l2_scale": _qk_l2_scale,
}


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int, ctx: ParallelContext = SINGLE):
        super().__init__()
        tp_group, sequence_parallel = ctx.tp_group, ctx.sp
        tp = ctx.tp
        self.layer_idx, self.kind = layer_idx, cfg.layer_attention(layer_idx)
        if self.kind == "identity":                # no weights: the path adds 0
            return
        if cfg.n_heads % tp or (cfg.kv_heads % tp and tp % cfg.kv_heads):
            raise ValueError(f"parallel.tp={tp} must divide model.n_heads={cfg.n_heads}, and divide or be a "
                             f"multiple of model.n_kv_heads={cfg.kv_heads}")
        hd, vd = cfg.qk_hd, cfg.v_hd
        self.hd, self.vd = hd, vd
        # Fewer kv heads than ranks: every rank computes all kv heads (replicated weights, gradients
        # summed over tp) and keeps the one its query heads use: kv head rank // (tp / n_kv_heads).
        self.kv_replicated = cfg.kv_heads < tp
        self.kv_select = group_rank(tp_group) // (tp // cfg.kv_heads) if self.kv_replicated else None
        self.n_heads, self.n_kv = cfg.n_heads // tp, max(1, cfg.kv_heads // tp)   # local head counts
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else hd ** -0.5
        if cfg.qk_norm == "l2_scale":              # g q^ . k^: the learned g is folded into q
            self.scale = 1.0
        self.softcap, self.attn_dropout = cfg.attn_softcap, cfg.attn_dropout
        self.sliding_window, self.local_window = cfg.sliding_window, cfg.local_window
        self.chunk = cfg.attention_chunk
        sp = dict(group=tp_group, sequence_parallel=sequence_parallel)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        qc = cfg.quant
        self.wq = ColumnParallelLinear(cfg.d_model, cfg.n_heads * hd, cfg.qkv_bias, **sp, input_ready=True, quant=qc)
        kv_cls = ReplicatedLinear if self.kv_replicated else ColumnParallelLinear
        self.wk = kv_cls(cfg.d_model, cfg.kv_heads * hd, cfg.qkv_bias, **sp, input_ready=True, quant=qc)
        self.wv = kv_cls(cfg.d_model, cfg.kv_heads * vd, cfg.qkv_bias, **sp, input_ready=True, quant=qc)
        self.wo = RowParallelLinear(cfg.n_heads * vd, cfg.d_model, cfg.attn_out_bias, **sp, residual_output=True,
                                    quant=qc)
        self.in_quant, self.o_quant = act_quant(qc, "qkv_in"), act_quant(qc, "o_in", tp_group)
        self.score_quant, self.prob_quant = act_quant(qc, "scores"), act_quant(qc, "probs")
        self.qkv_clip = cfg.qkv_clip
        self.qk_norm = cfg.qk_norm
        QK_NORM[cfg.qk_norm](self, cfg, tp_group)
        # a score function other than softmax (None: SDPA's softmax)
        explicit = cfg.attention_softmax != "softmax" or self.score_quant or self.prob_quant
        self.score = SCORE[cfg.attention_softmax](cfg, self.n_heads, tp_group) if explicit else None
        self.sinks = Sinks(self.n_heads, tp_group) if cfg.attention_sinks else None   # (H/tp,) logits
        position = cfg.layer_position(layer_idx)         # model.position_pattern entry, else model.position
        pos_cls = POSITION[position].get("attention")
        if pos_cls is None:
            self.pos = None
        elif position == "alibi":
            self.pos = pos_cls(cfg, group_rank(tp_group) * self.n_heads, self.n_heads)
        elif position == "rope" and self.kind in ("sliding", "local") and cfg.rope_theta_local is not None:
            # Gemma 3: local layers rotate with their own base and without the global layers' scaling
            self.pos = pos_cls(dataclasses.replace(cfg, rope_theta=cfg.rope_theta_local, rope_scaling="none"))
        else:
            self.pos = pos_cls(cfg)

    @staticmethod
    def _full_norm(cfg, local_heads, tp_group):
        norm = build_norm(cfg, local_heads * cfg.qk_hd)
        if group_size(tp_group) > 1:
            if not hasattr(norm, "stat_group"):
                raise ValueError(f"model.qk_norm='full' with parallel.tp > 1 needs model.norm='rmsnorm', got {cfg.norm!r}")
            norm.stat_group, norm.full_dim = tp_group, local_heads * cfg.qk_hd * group_size(tp_group)
            norm.weight.partition_dim = 0
        return norm

    def forward(self, x, pos, cache: KVCache | None = None):
        """x (B, T, D), pos (T,) absolute positions -> (B, T, D)."""
        if self.kind == "identity":
            if cache is not None:
                cache.advance(self.layer_idx, pos.shape[0])
            return torch.zeros_like(x)                                          # (B, T, D) or (B, T/tp, D)
        x = enter_tp_region(x, self.tp_group, self.sequence_parallel)        # one input-gradient reduction
        if self.in_quant is not None:
            x = self.in_quant(x)
        q, k, v = self.wq(x), self.wk(x), self.wv(x)                          # (B, T, H*hd), (B, T, Hkv*hd), (B, T, Hkv*vd)
        B, T = q.shape[:2]                     # T is the full length even when x is a sequence shard
        if self.qkv_clip is not None:
            q, k, v = (t.clamp(-self.qkv_clip, self.qkv_clip) for t in (q, k, v))
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_replicated:                 # (B, T, n_kv_heads*hd) -> (B, T, hd): this rank's kv head
            k = k.unflatten(-1, (-1, self.hd))[:, :, self.kv_select]
            v = v.unflatten(-1, (-1, self.vd))[:, :, self.kv_select]
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)                # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)                   # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv, self.vd).transpose(1, 2)                   # (B, Hkv, T, vd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(self.pos, Rotary):
            q, k = self.pos(q, k, pos)
        if self.qk_norm == "l2_scale":
            q, k = self.qk_scale(q, k)                                          # g q/||q||, k/||k||
        kpos = pos
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            kpos = torch.arange(k.shape[2], device=x.device)
        with tp_stream.fork(x.device) if self.training and self.attn_dropout else contextlib.nullcontext():
            o = ATTENTION[self.kind](self.kind, q, k, v, pos, kpos, self)      # (B, H, T, vd)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.vd)           # (B, T, H*vd), heads split over tp
        return self.wo(self.o_quant(o) if self.o_quant is not None else o)
