"""Position encodings (registry POSITION: name -> {"embed": cls} and/or {"attention": cls}).

learned:    x_t += P[t], P a learned (max_seq_len, D) table                      (GPT-2, OPT)
sinusoidal: x_t += PE[t], PE[t, 2i] = sin(t / 10000^(2i/D)), PE[t, 2i+1] = cos(...)
rope:       rotate pairs of q/k channels by angle t * theta^(-2i/r) over the first r = rotary_dim
            channels. Pairing: NeoX/Llama halves (i, i + r/2) or GPT-J interleaved (2i, 2i+1).
            Scaling: linear (t / factor) or Llama 3 (wavelength-dependent inverse frequencies).
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
    return inv


class Rotary(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.r, self.interleaved, self.cfg = cfg.rotary_dim, cfg.rope_interleaved, cfg
        self.init_buffers()

    def init_buffers(self):
        self.register_buffer("inv_freq", rope_inv_freq(self.cfg), persistent=False)

    def _cos_sin(self, pos, dtype):
        freqs = pos.float().unsqueeze(-1) * self.inv_freq.float()          # (T, r/2)
        if self.interleaved:
            freqs = freqs.repeat_interleave(2, dim=-1)                       # (T, r): f0 f0 f1 f1 ...
        else:
            freqs = torch.cat([freqs, freqs], dim=-1)                        # (T, r): f0 f1 ... f0 f1 ...
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
