"""Position encodings (registry POSITION: name -> {"embed": cls} and/or {"attention": cls}).

learned:    x_t += P[t], P a learned (max_seq_len, D) table                      (GPT-2, OPT)
sinusoidal: x_t += PE[t], PE[t, 2i] = sin(t / 10000^(2i/D)), PE[t, 2i+1] = cos(...)
rope:       rotate pairs of q/k channels by angle t * theta^(-2i/r) over the first r = rotary_dim
            channels. Pairing: NeoX/Llama halves (i, i + r/2) or GPT-J interleaved (2i, 2i+1).
            Scaling: linear (t / factor), Llama 3 (wavelength-dependent inverse frequencies) or YaRN
            (Peng et al. 2023): inv_i = interp_i (1 - e_i) + extrap_i e_i, extrap_i = theta^(-2i/r),
            interp_i = extrap_i / factor, e_i = 1 - clamp((i - lo) / (hi - lo), 0, 1) with lo, hi the
            dims at which beta_fast, beta_slow rotations fit the original context
            (d(n) = r ln(L_orig / (2 pi n)) / (2 ln theta), floored/ceiled when truncated), and cos,
            sin multiplied by the attention factor (default 0.1 ln(factor) + 1), as in transformers.
alibi:      score(i, j) += -m_h * (i - j), slopes m_h = 2^(-8 h / H) (Press et al., 2022)
none:       no position information (causal masking alone).
Per layer: model.position_pattern (cycled over layers, like attention_pattern) picks the in-attention
kind of each layer, e.g. ["rope", "rope", "rope", "none"] = NoPE on every 4th layer (SmolLM3); and
model.rope_theta_local gives sliding/local layers their own unscaled rope base (Gemma 3).
Modules with derived buffers recompute them in `init_buffers` (after a meta-device build).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from forge.parallel.quant import embed_quant


class LearnedPositions(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.d_model))
        self.weight_quant = embed_quant(cfg.quant)          # model.quant.embed_*: the table fake-quantised

    def forward(self, x, pos):  # x (B, T, D), pos (T,)
        w = self.weight_quant(self.weight) if self.weight_quant is not None else self.weight
        return x + w[pos].to(x.dtype)


class SinusoidalPositions(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.d, self.max_seq_len = cfg.d_model, cfg.max_seq_len
        self.init_buffers()

    def init_buffers(self):
        d = self.d
        t = torch.arange(self.max_seq_len, dtype=torch.float32).unsqueeze(1)
        inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        pe = torch.zeros(self.max_seq_len, d)
        pe[:, 0::2] = torch.sin(t * inv)
        pe[:, 1::2] = torch.cos(t * inv[: d // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x, pos):
        return x + self.pe[pos].to(x.dtype)


def rope_inv_freq(cfg) -> torch.Tensor:
    """Inverse frequencies (r/2,) after the configured scaling."""
    r = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        # Wavelengths longer than old_ctx/low_freq_factor are divided by `factor`, shorter than
        # old_ctx/high_freq_factor kept, and those in between interpolated smoothly.
        factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif cfg.rope_scaling == "yarn":
        inv = _yarn_inv_freq(cfg, inv)
    return inv


def _yarn_inv_freq(cfg, extrap: torch.Tensor) -> torch.Tensor:
    """YaRN's blend of extrapolated (theta^(-2i/r)) and interpolated (/ factor) frequencies."""
    r, base, old = cfg.rotary_dim, cfg.rope_theta, cfg.rope_original_max_seq_len

    def dim_of(rotations):      # the dim whose wavelength fits `rotations` times into the old context
        return r * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = dim_of(cfg.rope_yarn_beta_fast), dim_of(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, r - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(r // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    e = 1 - ramp                                        # 1: extrapolate (high frequencies), 0: interpolate
    pos_freqs = base ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r)
    return 1.0 / (cfg.rope_scaling_factor * pos_freqs) * (1 - e) + extrap * e


def rope_attention_factor(cfg) -> float:
    """The factor cos and sin are multiplied by: YaRN's attention factor, else 1."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    f = cfg.rope_scaling_factor
    return 1.0 if f <= 1 else 0.1 * math.log(f) + 1.0


class Rotary(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.r, self.interleaved, self.cfg = cfg.rotary_dim, cfg.rope_interleaved, cfg
        self.mscale = rope_attention_factor(cfg)
        self.init_buffers()

    def init_buffers(self):
        self.register_buffer("inv_freq", rope_inv_freq(self.cfg), persistent=False)

    def _cos_sin(self, pos, dtype):
        freqs = pos.float().unsqueeze(-1) * self.inv_freq.float()          # (T, r/2)
        if self.interleaved:
            freqs = freqs.repeat_interleave(2, dim=-1)                       # (T, r): f0 f0 f1 f1 ...
        else:
            freqs = torch.cat([freqs, freqs], dim=-1)                        # (T, r): f0 f1 ... f0 f1 ...
        if self.mscale != 1.0:
            return (freqs.cos() * self.mscale).to(dtype), (freqs.sin() * self.mscale).to(dtype)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def _rotate(self, x):
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, q, k, pos):  # q (B, H, T, hd), k (B, Hkv, T, hd), pos (T,)
        cos, sin = self._cos_sin(pos, q.dtype)
        out = []
        for x in (q, k):
            xr, xp = x[..., : self.r], x[..., self.r:]
            out.append(torch.cat((xr * cos + self._rotate(xr) * sin, xp), dim=-1))
        return out[0], out[1]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Slopes of Press et al.: geometric 2^(-8/n) for a power of two n, else interleaved fill-in."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n_heads).is_integer():
        return torch.tensor(pow2(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest])


class Alibi(nn.Module):
    def __init__(self, cfg, head_start=0, n_local_heads=None):
        super().__init__()
        self.heads = (cfg.n_heads, head_start, n_local_heads or cfg.n_heads)
        self.init_buffers()

    def init_buffers(self):
        n_heads, start, n = self.heads
        self.register_buffer("slopes", alibi_slopes(n_heads)[start: start + n], persistent=False)

    def bias(self, qpos, kpos):  # -> (H, Tq, Tk): -m_h * (i - j)
        dist = (qpos.unsqueeze(-1) - kpos.unsqueeze(0)).float()
        return -self.slopes.view(-1, 1, 1) * dist


POSITION = {
    "learned": {"embed": LearnedPositions},
    "sinusoidal": {"embed": SinusoidalPositions},
    "rope": {"attention": Rotary},
    "alibi": {"attention": Alibi},
    "none": {},
}
