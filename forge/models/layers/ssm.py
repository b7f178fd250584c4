"""Selective state-space mixer (Mamba-2, Dao & Gu 2024, "Transformers are SSMs"): attention kind `ssm`.

Sizes: D = model.d_model, I = model.ssm_expand * D (inner width), P = model.ssm_head_dim, H = I / P
heads, G = model.ssm_n_groups (heads h share B, C of group h // (H / G)), N = model.ssm_state_size,
K = model.ssm_conv_kernel. For an input u (B, T, D):
    z = u W_z (I),  x = u W_x (I),  b = u W_B (G N),  c = u W_C (G N),  dt' = u W_dt (H)
    x, b, c <- silu(causal depthwise conv_K(.) + bias)          (each channel over its last K inputs)
    dt = clamp(softplus(dt' + dt_bias), dt_clamp_min, dt_clamp_max),  A = -exp(A_log)   (per head)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t b_t^T       (per head: state (P, N), h_0 = 0)
    y_t = h_t c_t + D x_t
    out = RMSNorm_G(y * silu(z)) W_out               (RMS over each group's I / G channels)
The recurrence runs in one of two exact forms:
  chunked (ssd_chunked; training, prefill): the sequence is cut into chunks of Q = model.ssm_chunk_size;
    with s_t the cumulative sum of a = dt A inside a chunk, a query t sees each earlier u of its chunk
    with weight exp(s_t - s_u) (c_t . b_u) dt_u (a masked decaying "attention", quadratic in Q) and the
    chunk's start state h' through exp(s_t) c_t h'; the state passes from chunk to chunk as
    h'' = exp(s_Q) h' + sum_u exp(s_Q - s_u) dt_u x_u b_u^T. O(T Q) work, O(T / Q) sequential steps.
  recurrent (ssd_step; decoding one token): the update above, with the conv inputs of the last K - 1
    tokens and the state h kept per layer in the KVCache (cache.state[layer] = (conv, h)).
Tensor parallelism: heads are split over tp as attention heads are: W_z, W_x, W_dt, the x conv,
dt_bias, A_log, D and the norm weight by head (column-parallel, rank r holds heads r H/tp ...),
W_out row-parallel. B and C are split by group when tp divides G; when G < tp (tp a multiple of G)
every rank computes all groups' B, C (replicated weights, gradients summed over tp) and keeps its
heads' group. The gated norm's statistic is local when a rank holds whole groups; when a group
spans tp / G ranks its sum of squares is all-reduced over tp (each rank adding into its group's slot).
Quantisation-aware training (model.quant): the projections' weights are fake-quantised (or BitNet
linears) as attention's are; the activation points (qkv_in, o_in, scores, probs) are attention's only.
Initialisation (layout independent): A_log = log(1..H), D = 1, dt_bias = softplus^-1 of dt spaced
geometrically from model.ssm_dt_min to ssm_dt_max over the H heads (each rank its heads' part),
conv weights N(0, 1 / sqrt(3 K)) (the variance of PyTorch's default conv init), linears as others.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.layers import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, _mark,
                                   enter_tp_region)
from forge.parallel.mappings import all_reduce_sum, copy_to


def fp32(fn):
    """Run `fn` in fp32 with autocast off (mixed precision would run its einsums in 16 bits)."""
    def wrapped(*args, **kw):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kw)
    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@fp32
def ssd_chunked(x, dt, A, b, c, chunk: int, h0=None):
    """The chunked scan. x (B, T, H, P), dt (B, T, H) (> 0), A (H,) (< 0), b and c (B, T, G, N) with
    head h reading group h // (H / G), h0 (B, H, P, N) or None (zeros) -> y (B, T, H, P) (without the
    D x skip) and the final state (B, H, P, N). fp32 inside."""
    Bsz, T, H, P = x.shape
    G, N = b.shape[2:]
    k = H // G                                                                 # heads per group
    pad = (-T) % chunk                    # zero dt past the end: no input, no decay, state unchanged
    if pad:
        x, dt, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, b, c))
    x, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    n = (T + pad) // chunk
    xdt = (x * dt.unsqueeze(-1)).view(Bsz, n, chunk, G, k, P)                # (B, n, Q, G, k, P)
    b, c = b.view(Bsz, n, chunk, G, N), c.view(Bsz, n, chunk, G, N)            # (B, n, Q, G, N)
    s = (dt * A.float()).view(Bsz, n, chunk, H).permute(0, 3, 1, 2).cumsum(-1)  # (B, H, n, Q) cumulative log decay
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    seg = (s.unsqueeze(-1) - s.unsqueeze(-2)).masked_fill(~causal, float("-inf"))   # (B, H, n, Q_t, Q_u)
    cb = torch.einsum("bctgn,bcugn->bgctu", c, b)                              # (B, G, n, Q, Q), once per group
    scores = cb.unsqueeze(2) * seg.exp().view(Bsz, G, k, n, chunk, chunk)     # (B, G, k, n, Q, Q)
    y = torch.einsum("bgkctu,bcugkp->bctgkp", scores, xdt)                    # within each chunk
    to_end = (s[..., -1:] - s).exp().view(Bsz, G, k, n, chunk)               # decay u -> chunk end
    inputs = torch.einsum("bcugn,bgkcu,bcugkp->bcgkpn", b, to_end, xdt).reshape(Bsz, n, H, P, N)
    h = x.new_zeros(Bsz, H, P, N) if h0 is None else h0.float()
    starts = []
    for i in range(n):                                                         # state at each chunk start
        starts.append(h)
        h = s[:, :, i, -1].exp()[..., None, None] * h + inputs[:, i]
    starts = torch.stack(starts, dim=1).view(Bsz, n, G, k, P, N)
    decay = s.exp().view(Bsz, G, k, n, chunk).permute(0, 3, 4, 1, 2).unsqueeze(-1)  # (B, n, Q, G, k, 1)
    y = y + torch.einsum("bctgn,bcgkpn->bctgkp", c, starts) * decay
    return y.reshape(Bsz, n * chunk, H, P)[:, :T], h


@fp32
def ssd_step(x, dt, A, b, c, h):
    """One token of the recurrence: x (B, H, P), dt (B, H), A (H,), b and c (B, G, N), h (B, H, P, N)
    -> y (B, H, P) (without D x), the new state h' = exp(dt A) h + dt x b^T, y = h' c."""
    k = x.shape[1] // b.shape[1]
    b, c = b.float().repeat_interleave(k, dim=1), c.float().repeat_interleave(k, dim=1)   # (B, H, N)
    dt = dt.float()
    h = (dt * A.float()).exp()[..., None, None] * h.float() + (dt.unsqueeze(-1) * x.float()).unsqueeze(-1) * \
        b.unsqueeze(-2)                                                        # (B, H, P, N)
    return (h @ c.unsqueeze(-1)).squeeze(-1), h


class CausalConv(nn.Module):
    """Depthwise causal convolution over time, weight (C, K), bias (C,): out_t = sum_k w_k in_{t-K+1+k} + bias."""

    def __init__(self, channels, kernel, bias, group=None, split=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.weight_std = (3 * kernel) ** -0.5          # forge.models.init reads it
        self.group, self.split = group, split           # split: this rank's channels; else replicated
        if split:
            _mark(self.weight, 0, group)
            _mark(self.bias, 0, group)

    def forward(self, u, prev):
        """u (B, T, C), prev (B, K-1, C) the inputs before u -> (B, T, C) and the last K-1 inputs."""
        w, bias = self.weight, self.bias
        if not self.split:                              # replicated: partial gradients summed over tp
            w, bias = copy_to(w, self.group), None if bias is None else copy_to(bias, self.group)
        full = torch.cat([prev.to(u.dtype), u], dim=1)                           # (B, K-1+T, C)
        out = F.conv1d(full.transpose(1, 2), w.unsqueeze(1), bias, groups=w.shape[0])   # (B, C, T)
        return out.transpose(1, 2), full[:, full.shape[1] - prev.shape[1]:]


class GatedRMSNorm(nn.Module):
    """y = RMSNorm_G(x * silu(z)) w: mean of squares over each group of `group_size` channels; this
    rank holds `local` channels starting at channel `start` of the full width (see the module docstring)."""

    def __init__(self, local, group_size, eps, start, n_groups, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(local))
        _mark(self.weight, 0, group)
        self.eps, self.group_size, self.start, self.n_groups, self.group = eps, group_size, start, n_groups, group

    def init_constants(self):
        self.weight.fill_(1.0)

    def forward(self, x, z):  # (B, T, I/tp) twice -> (B, T, I/tp)
        g = x.float() * F.silu(z.float())
        if g.shape[-1] >= self.group_size:               # whole groups on this rank
            gg = g.unflatten(-1, (-1, self.group_size))  # (B, T, G/tp, I/G)
            g = (gg * torch.rsqrt(gg.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        else:                                            # a part of one group: its sum over tp
            slot = self.start // self.group_size
            part = g.pow(2).sum(-1, keepdim=True)                                # (B, T, 1)
            sums = F.pad(part, (slot, self.n_groups - slot - 1))                 # (B, T, G)
            ms = all_reduce_sum(sums, self.group)[..., slot:slot + 1] / self.group_size
            g = g * torch.rsqrt(ms + self.eps)
        return (g * self.weight.float()).to(x.dtype)


class Mamba2Mixer(nn.Module):
    """The attention-path module of an `ssm` layer: (B, T, D) -> (B, T, D) (see the module docstring)."""

    def __init__(self, cfg, layer_idx: int, ctx: ParallelContext = SINGLE):
        super().__init__()
        tp, rank, group = ctx.tp, ctx.tp_rank, ctx.tp_group
        I, P, G, N, K = cfg.ssm_inner, cfg.ssm_head_dim, cfg.ssm_n_groups, cfg.ssm_state_size, cfg.ssm_conv_kernel
        H = I // P
        self.layer_idx, self.kind = layer_idx, "ssm"
        self.H, self.P, self.N, self.K, self.chunk = H // tp, P, N, K, cfg.ssm_chunk_size
        self.n_heads_total, self.head_start = H, rank * (H // tp)
        self.bc_replicated = G < tp
        self.G = G if self.bc_replicated else G // tp                 # groups computed on this rank
        self.group_select = rank // (tp // G) if self.bc_replicated else None
        self.dt_range = (cfg.ssm_dt_min, cfg.ssm_dt_max)
        self.dt_clamp = (cfg.ssm_dt_clamp_min, cfg.ssm_dt_clamp_max)
        self.tp_group, self.sequence_parallel = group, ctx.sp
        sp = dict(group=group, sequence_parallel=ctx.sp, input_ready=True, quant=cfg.quant)
        bias = cfg.ssm_proj_bias
        self.in_z = ColumnParallelLinear(cfg.d_model, I, bias, **sp)
        self.in_x = ColumnParallelLinear(cfg.d_model, I, bias, **sp)
        bc_cls = ReplicatedLinear if self.bc_replicated else ColumnParallelLinear
        self.in_b = bc_cls(cfg.d_model, G * N, bias, **sp)
        self.in_c = bc_cls(cfg.d_model, G * N, bias, **sp)
        self.in_dt = ColumnParallelLinear(cfg.d_model, H, bias, **sp)
        self.conv_x = CausalConv(I // tp, K, cfg.ssm_conv_bias, group)
        split_bc = not self.bc_replicated
        self.conv_b = CausalConv(self.G * N, K, cfg.ssm_conv_bias, group, split=split_bc)
        self.conv_c = CausalConv(self.G * N, K, cfg.ssm_conv_bias, group, split=split_bc)
        self.dt_bias = nn.Parameter(torch.empty(H // tp))             # (H/tp,)
        self.A_log = nn.Parameter(torch.empty(H // tp))
        self.D = nn.Parameter(torch.empty(H // tp))
        for p in (self.dt_bias, self.A_log, self.D):
            _mark(p, 0, group)
        self.norm = GatedRMSNorm(I // tp, I // G, cfg.norm_eps, rank * (I // tp), G, group)
        self.wo = RowParallelLinear(I, cfg.d_model, bias, group=group, sequence_parallel=ctx.sp,
                                    residual_output=True, quant=cfg.quant)

    def init_constants(self):
        """A_log = log(1..H), D = 1, dt_bias = softplus^-1(dt), dt geometric in [dt_min, dt_max] (this rank's heads)."""
        h = torch.arange(self.head_start, self.head_start + self.H, dtype=torch.float32, device=self.D.device)
        self.A_log.copy_(torch.log(h + 1))
        self.D.fill_(1.0)
        lo, hi = (math.log(v) for v in self.dt_range)
        frac = h / max(self.n_heads_total - 1, 1)
        dt = torch.exp(lo + frac * (hi - lo))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))        # softplus(dt_bias) = dt

    def _groups_bc(self, t):  # (B, T, G_local * N) -> (B, T, groups of this rank's heads, N)
        t = t.unflatten(-1, (self.G, self.N))
        return t[:, :, self.group_select].unsqueeze(2) if self.bc_replicated else t

    def forward(self, u, pos, cache=None):
        """u (B, T, D) (or (B, T/tp, D) under sequence parallelism), pos (T,) unused -> (B, T, D)."""
        u = enter_tp_region(u, self.tp_group, self.sequence_parallel)
        Bsz, T = u.shape[:2]
        z, x, b, c, dt = self.in_z(u), self.in_x(u), self.in_b(u), self.in_c(u), self.in_dt(u)
        state = None if cache is None else cache.state[self.layer_idx]
        if state is None:
            zeros = u.new_zeros(Bsz, self.K - 1, 1)
            prev, h0 = (zeros.expand(-1, -1, t.shape[-1]) for t in (x, b, c)), None
        else:
            prev, h0 = state
        (x, px), (b, pb), (c, pc) = (conv(t, p) for conv, t, p in
                                     zip((self.conv_x, self.conv_b, self.conv_c), (x, b, c), prev))
        x, b, c = F.silu(x), F.silu(b), F.silu(c)                     # (B, T, I/tp), (B, T, G_local N) x2
        dt = F.softplus(dt.float() + self.dt_bias.float())            # (B, T, H/tp)
        lo, hi = self.dt_clamp
        dt = dt.clamp(lo, hi) if hi is not None else (dt.clamp_min(lo) if lo > 0 else dt)
        A = -torch.exp(self.A_log.float())
        xh = x.view(Bsz, T, self.H, self.P)                            # (B, T, H/tp, P)
        bh, ch = self._groups_bc(b), self._groups_bc(c)                # (B, T, G/tp or 1, N)
        if cache is not None and T == 1 and h0 is not None:
            y, h = ssd_step(xh[:, 0], dt[:, 0], A, bh[:, 0], ch[:, 0], h0)
            y = y.unsqueeze(1)                                         # (B, 1, H/tp, P)
        else:
            y, h = ssd_chunked(xh, dt, A, bh, ch, self.chunk, h0)
        if cache is not None:
            cache.state[self.layer_idx] = ((px, pb, pc), h)
            cache.advance(self.layer_idx, T)
        y = y + self.D.float()[:, None] * xh.float()                   # (B, T, H/tp, P)
        y = self.norm(y.reshape(Bsz, T, self.H * self.P).to(u.dtype), z)
        return self.wo(y)                                              # (B, T, D)
