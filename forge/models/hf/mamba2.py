"""Mamba2ForCausalLM as a family: every layer a Mamba-2 mixer (model.attention = "ssm"), one RMSNorm
before it, no MLP (model.mlp = "identity", model.norm_mlp = "identity"), a final RMSNorm, no positions.

HF mixer tensors -> Forge (I = ssm_expand * d_model, G N = ssm_n_groups * ssm_state_size, H heads):
    in_proj (2 I + 2 G N + H, D), rows [z | x | B | C | dt]  -> attn.in_z, in_x, in_b, in_c, in_dt (and biases)
    conv1d  (I + 2 G N, 1, K), channels [x | B | C]          -> attn.conv_x, conv_b, conv_c (C, K) (and biases)
    dt_bias, A_log, D, norm.weight, out_proj                 -> attn.dt_bias, A_log, D, norm.weight, wo
HF keeps no context length; Forge's model.max_seq_len travels as the extra config key
max_position_embeddings (2048 when absent).
"""
from __future__ import annotations

import math

import torch

from forge.config import ModelConfig
from forge.models.hf.common import FamilySpec, Transform, UnsupportedModelError, _get, hf_config_object

DEFAULT_MAX_SEQ_LEN = 2048


def mamba2_from_hf(d) -> ModelConfig:
    c = hf_config_object(d, "mamba2")
    if c.hidden_act != "silu":
        raise UnsupportedModelError(f"Mamba2 hidden_act={c.hidden_act!r} is not supported (supported: ['silu'])")
    lo, hi = (float(v) for v in c.time_step_limit)
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_heads, head_dim=c.head_dim,            # never read by ssm layers; set so tp checks see the heads
        max_seq_len=int(_get(c, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN)),
        attention="ssm", position="none", mlp="identity", norm="rmsnorm", norm_mlp="identity",
        norm_eps=float(c.layer_norm_epsilon), tie_embeddings=bool(c.tie_word_embeddings),
        init_std=float(c.initializer_range), ssm_state_size=c.state_size, ssm_n_groups=c.n_groups,
        ssm_head_dim=c.head_dim, ssm_expand=c.expand, ssm_conv_kernel=c.conv_kernel,
        ssm_conv_bias=bool(c.use_conv_bias), ssm_proj_bias=bool(c.use_bias), ssm_chunk_size=c.chunk_size,
        ssm_dt_min=float(c.time_step_min), ssm_dt_max=float(c.time_step_max), ssm_dt_clamp_min=lo,
        ssm_dt_clamp_max=None if math.isinf(hi) else hi).validate()


def mamba2_to_hf(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_heads=cfg.ssm_inner // cfg.ssm_head_dim, head_dim=cfg.ssm_head_dim, state_size=cfg.ssm_state_size,
                n_groups=cfg.ssm_n_groups, expand=cfg.ssm_expand, conv_kernel=cfg.ssm_conv_kernel,
                use_conv_bias=cfg.ssm_conv_bias, use_bias=cfg.ssm_proj_bias, chunk_size=cfg.ssm_chunk_size,
                time_step_min=cfg.ssm_dt_min, time_step_max=cfg.ssm_dt_max,
                time_step_limit=[cfg.ssm_dt_clamp_min, math.inf if cfg.ssm_dt_clamp_max is None else cfg.ssm_dt_clamp_max],
                layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                initializer_range=cfg.init_std, hidden_act="silu", max_position_embeddings=cfg.max_seq_len)


def _in_sizes(cfg):        # in_proj rows: z, x, B, C, dt
    gn = cfg.ssm_n_groups * cfg.ssm_state_size
    return [cfg.ssm_inner, cfg.ssm_inner, gn, gn, cfg.ssm_inner // cfg.ssm_head_dim]


def _conv_sizes(cfg):      # conv1d channels: x, B, C
    gn = cfg.ssm_n_groups * cfg.ssm_state_size
    return [cfg.ssm_inner, gn, gn]


def _split(sizes):
    def to_forge(ts, cfg):
        t = ts[0].squeeze(1) if ts[0].dim() == 3 else ts[0]          # conv1d weight (C, 1, K) -> (C, K)
        return [p.contiguous() for p in t.split(sizes(cfg), dim=0)]
    return to_forge


def _cat(conv_weight: bool):
    def to_hf(ts, cfg):
        t = torch.cat(ts, dim=0)
        return [(t.unsqueeze(1) if conv_weight else t).contiguous()]
    return to_hf


def mamba2_rules():
    L, F = "backbone.layers.{i}.", "layers.{i}."
    key_map = {"backbone.embeddings.weight": "embed.tok.weight", "backbone.norm_f.weight": "norm.weight",
               "lm_head.weight": "head.proj.weight", L + "norm.weight": F + "attn_norm.weight"}
    for name in ("dt_bias", "A_log", "D"):
        key_map[L + "mixer." + name] = F + "attn." + name
    key_map.update({L + "mixer.norm.weight": F + "attn.norm.weight", L + "mixer.out_proj.weight": F + "attn.wo.weight",
                    L + "mixer.out_proj.bias": F + "attn.wo.bias"})
    transforms = []
    for s in ("weight", "bias"):
        transforms.append(Transform(f"mamba2_in_proj_{s}", (L + f"mixer.in_proj.{s}",),
                                    tuple(F + f"attn.{w}.{s}" for w in ("in_z", "in_x", "in_b", "in_c", "in_dt")),
                                    _split(_in_sizes), _cat(False)))
        transforms.append(Transform(f"mamba2_conv1d_{s}", (L + f"mixer.conv1d.{s}",),
                                    tuple(F + f"attn.{w}.{s}" for w in ("conv_x", "conv_b", "conv_c")),
                                    _split(_conv_sizes), _cat(s == "weight")))
    return key_map, transforms


_key_map, _transforms = mamba2_rules()
MAMBA2 = FamilySpec("Mamba2ForCausalLM", "mamba2", mamba2_from_hf, mamba2_to_hf, _key_map, _transforms,
                    ignore=(), base_prefix="backbone.")
