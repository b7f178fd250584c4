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
    ssm:     a selective state-space layer (Mamba-2) in place of attention: its own module,
             forge.models.layers.ssm.Mamba2Mixer (forge.models.block.MIXER picks it per layer).
    mla:     multi-head latent attention (DeepSeek-V2/V3): its own module, forge.models.layers.mla,
             whose causal softmax runs through softmax_attention; the KV cache holds its latent.
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
Sub-norm (model.attn_sub_norm, BitNet b1.58): o -> N(o) over the heads' concatenated output
(B, T, H * vd) before wo (and before o_in's quantisation); under tp its mean square is all-reduced.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge.models.layers.norm import build_norm, build_split_norm
from forge.models.layers.position import POSITION, Rotary
from forge.models.layers.scores import SCORE, Sinks, sink_softmax
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, enter_tp_region
from forge.parallel.mappings import copy_to, group_rank
from forge.parallel.quant import act_quant
from forge.parallel.random import tp_stream


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, Hkv, S, qk_hd) and (B, Hkv, S, v_hd)
    (an mla layer: its latent (B, 1, S, kv_lora_rank) and rotary key (B, 1, S, qk_rope_head_dim));
    `seen[i]`: tokens layer i has passed (identity layers store no keys but count them);
    `state[i]`: a recurrent layer's state instead of keys (ssm: its conv inputs and scan state)."""

    def __init__(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.seen = [0] * n_layers
        self.state = [None] * n_layers

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


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """Everything an attention kernel (ATTENTION) reads besides q, k, v and the positions, so that a
    kernel can be called and tested without an Attention module (Attention.spec builds one per call).
    kind: the mask (`_allowed`): causal, sliding (sliding_window), local (local_window);
    scale: s = scale * q k^T;  softcap: s -> cap * tanh(s / cap) (None: off);
    dropout: the probabilities' dropout rate, 0 outside training;
    bias: (qpos (Tq,), kpos (Tk,)) -> an additive (H, Tq, Tk) score bias (ALiBi), or None;
    score: p(s, allowed) of a score function (SCORE), None for softmax through SDPA;
    sinks: (H,) sink logits (scores.sink_softmax), or None;
    score_quant / prob_quant: fake quantisers of the scores s and the weights p (explicit path), or None;
    chunk: queries per chunk of the explicit path."""
    kind: str
    scale: float
    sliding_window: int | None = None
    local_window: int | None = None
    softcap: float | None = None
    dropout: float = 0.0
    bias: Callable | None = None
    score: Callable | None = None
    sinks: torch.Tensor | None = None
    score_quant: Callable | None = None
    prob_quant: Callable | None = None
    chunk: int = 256


def _allowed(spec, qpos, kpos):
    """Boolean (Tq, Tk) mask of the keys each query may attend to."""
    diff = qpos.unsqueeze(-1) - kpos.unsqueeze(0)
    ok = diff >= 0
    if spec.kind == "sliding":
        ok &= diff < spec.sliding_window
    elif spec.kind == "local":
        ok &= (qpos.unsqueeze(-1) // spec.local_window) == (kpos.unsqueeze(0) // spec.local_window)
    return ok


def _repeat_kv(q, k, v):
    """GQA/MQA: k, v (B, Hkv, Tk, *) -> (B, H, Tk, *), each kv head serving H / Hkv query heads."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return k, v


def softmax_attention(q, k, v, qpos, kpos, spec: AttnSpec):
    """q (B, H, Tq, hd), k/v (B, Hkv, Tk, hd), qpos (Tq,), kpos (Tk,) -> (B, H, Tq, v_hd)."""
    if spec.score is not None or spec.sinks is not None:
        return scored_attention(q, k, v, qpos, kpos, spec)
    k, v = _repeat_kv(q, k, v)
    dropout = spec.dropout
    bias = spec.bias(qpos, kpos) if spec.bias is not None else None           # (H, Tq, Tk) or None
    plain_causal = spec.kind == "causal" and bias is None and spec.softcap is None
    # `kpos is qpos` (no cache) decides without a host sync, which torch.compile cannot trace
    if plain_causal and q.shape[2] == k.shape[2] and (kpos is qpos or bool(qpos[0] == kpos[0])):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=spec.scale)
    allowed = _allowed(spec, qpos, kpos)                                        # (Tq, Tk)
    if spec.softcap is None:
        mask = allowed if bias is None else bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=spec.scale)
    s = (q.float() @ k.float().transpose(-1, -2)) * spec.scale                  # (B, H, Tq, Tk)
    s = spec.softcap * torch.tanh(s / spec.softcap)
    if bias is not None:
        s = s + bias
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
    return F.dropout(p, dropout, dropout > 0) @ v


def _scored_chunk(spec, q, k, v, qpos, kpos):
    """One chunk of queries: q (B, H, C, hd), k (B, H, Tk, hd), v (B, H, Tk, v_hd) -> (B, H, C, v_hd)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * spec.scale                 # (B, H, C, Tk)
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if spec.bias is not None:
        s = s + spec.bias(qpos, kpos)                                           # (H, C, Tk)
    allowed = _allowed(spec, qpos, kpos)
    if spec.score_quant is not None:                          # masked scores never enter a row's scale
        s = spec.score_quant(s.masked_fill(~allowed, 0.0))
    if spec.sinks is not None:
        p = sink_softmax(s, allowed, spec.sinks)                                # 0 where masked
    else:
        p = spec.score(s, allowed)                                              # 0 where masked
    if spec.prob_quant is not None:
        p = spec.prob_quant(p)
    p = F.dropout(p, spec.dropout, True) if spec.dropout else p
    return (p @ v.float()).to(v.dtype)


def scored_attention(q, k, v, qpos, kpos, spec: AttnSpec):
    """Attention with an explicit score function p(s) (model.attention_softmax, or softmax with
    sinks), chunk by chunk over
    the queries: memory O(chunk * Tk) per head; under autograd each chunk but a lone one is
    checkpointed (its scores are recomputed in backward, dropout masks included)."""
    k, v = _repeat_kv(q, k, v)
    C, T = spec.chunk, q.shape[2]
    if T <= C:
        return _scored_chunk(spec, q, k, v, qpos, kpos)
    out = []
    for s in range(0, T, C):
        args = (spec, q[:, :, s:s + C], k, v, qpos[s:s + C], kpos)
        if torch.is_grad_enabled():
            out.append(checkpoint(_scored_chunk, *args, use_reentrant=False))
        else:
            out.append(_scored_chunk(*args))
    return torch.cat(out, dim=2)                                                # (B, H, T, v_hd)


def identity_attention(q, k, v, qpos, kpos, spec):
    """Never called: an identity layer returns 0 before computing q, k, v (Attention.forward)."""
    raise RuntimeError("identity attention computes nothing")


def ssm_attention(q, k, v, qpos, kpos, spec):
    """Never called: an ssm layer is a Mamba2Mixer (forge.models.block.MIXER), which has no queries or keys."""
    raise RuntimeError("ssm layers are computed by forge.models.layers.ssm.Mamba2Mixer")


def linear_attention(q, k, v, qpos, kpos, spec=None, chunk: int = 64):
    """Causal linear attention, chunked: quadratic inside a chunk, a running state across chunks
    (causal whatever spec says; it reads nothing from it)."""
    k, v = _repeat_kv(q, k, v)
    q, k = F.elu(q.float()) + 1, F.elu(k.float()) + 1
    vf = v.float()
    if q.shape[2] != k.shape[2]:            # decoding with a cache: queries see every cached key <= them
        a = (q @ k.transpose(-1, -2)).masked_fill(~_allowed(CAUSAL, qpos, kpos), 0.0)
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


def mla_attention(q, k, v, qpos, kpos, spec):
    """Never called: an mla layer is an MLAttention (forge.models.layers.mla), not an Attention."""
    raise RuntimeError("mla attention is computed by forge.models.layers.mla.MLAttention")


CAUSAL = AttnSpec("causal", 1.0)     # the causal mask alone (linear attention under a cache)

ATTENTION = {   # kind -> kernel(q, k, v, qpos, kpos, spec: AttnSpec)
    "causal": softmax_attention,
    "sliding": softmax_attention,
    "local": softmax_attention,
    "linear": linear_attention,
    "identity": identity_attention,
    "ssm": ssm_attention,
    "mla": mla_attention,
}

# ReaLLM-Forge kinds that are not causal as defined there, with the reason (ConfigError on use)
REFUSED_ATTENTION = {
    "co4": "ReaLLM-Forge's co4 modulates the latent queries, keys and values with their means over "
           "all N tokens and then gives every token the mean of its latent outputs (y repeated over "
           "N), so each position sees future tokens; it has no causal form to train a decoder with",
}


def _qk_head(attn, cfg, tp_group):          # one (hd,) norm shared by heads that live on different ranks
    attn.q_norm = build_norm(cfg, cfg.qk_head_dim, grad_group=tp_group)
    attn.k_norm = build_norm(cfg, cfg.qk_head_dim, grad_group=tp_group)


def _qk_full(attn, cfg, tp_group):          # a norm over all heads: weights and statistics split over tp
    attn.q_norm = attn._full_norm(cfg, attn.n_heads, tp_group)
    attn.k_norm = (build_norm(cfg, cfg.n_kv_heads * cfg.qk_head_dim, grad_group=tp_group) if attn.kv_replicated
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
        hd, vd = cfg.qk_head_dim, cfg.v_head_dim
        self.hd, self.vd = hd, vd
        # Fewer kv heads than ranks: every rank computes all kv heads (replicated weights, gradients
        # summed over tp) and keeps the one its query heads use: kv head rank // (tp / n_kv_heads).
        self.kv_replicated = cfg.n_kv_heads < tp
        self.kv_select = group_rank(tp_group) // (tp // cfg.n_kv_heads) if self.kv_replicated else None
        self.n_heads, self.n_kv = cfg.n_heads // tp, max(1, cfg.n_kv_heads // tp)   # local head counts
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
        self.wk = kv_cls(cfg.d_model, cfg.n_kv_heads * hd, cfg.qkv_bias, **sp, input_ready=True, quant=qc)
        self.wv = kv_cls(cfg.d_model, cfg.n_kv_heads * vd, cfg.qkv_bias, **sp, input_ready=True, quant=qc)
        self.wo = RowParallelLinear(cfg.n_heads * vd, cfg.d_model, cfg.attn_out_bias, **sp, residual_output=True,
                                    quant=qc)
        self.in_quant, self.o_quant = act_quant(qc, "qkv_in"), act_quant(qc, "o_in", tp_group)
        # model.attn_sub_norm (BitNet): a norm over all heads' output, statistics and weight split over tp
        self.sub_norm = (build_split_norm(cfg, self.n_heads * vd, tp_group, cfg.attn_sub_norm, "model.attn_sub_norm")
                         if cfg.attn_sub_norm else None)
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

    def spec(self) -> AttnSpec:
        """This layer's kernel arguments (built per call: dropout follows self.training, and the sink
        logits are the current parameter, which a meta build replaces)."""
        return AttnSpec(kind=self.kind, scale=self.scale, sliding_window=self.sliding_window,
                        local_window=self.local_window, softcap=self.softcap,
                        dropout=self.attn_dropout if self.training else 0.0, bias=getattr(self.pos, "bias", None),
                        score=self.score, sinks=None if self.sinks is None else self.sinks.weight,
                        score_quant=self.score_quant, prob_quant=self.prob_quant, chunk=self.chunk)

    @staticmethod
    def _full_norm(cfg, local_heads, tp_group):
        return build_split_norm(cfg, local_heads * cfg.qk_head_dim, tp_group, what="model.qk_norm='full'")

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
            o = ATTENTION[self.kind](q, k, v, pos, kpos, self.spec())          # (B, H, T, vd)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.vd)           # (B, T, H*vd), heads split over tp
        if self.sub_norm is not None:
            o = self.sub_norm(o)
        return self.wo(self.o_quant(o) if self.o_quant is not None else o)
