"""The Gemma families: Gemma (Llama wiring, RMSNorm scale 1 + weight, embeddings x sqrt(d_model)),
Gemma 2 (+ norms after attention and MLP, soft-capped scores and logits, sliding layers) and Gemma 3
(+ per-head q/k norms, its own rope theta on the sliding layers).
"""
from __future__ import annotations

from forge.models.hf.common import (UnsupportedModelError, _layer_types_to_hf, _reject_unless, _rope_from_hf,
                                    hf_config_object)
from forge.models.hf.llama import _llama_like_from_hf, _llama_like_to_hf, llama_map


def _gemma_extra(d_model):
    return dict(norm_offset=1.0, embed_scale=d_model ** 0.5)


def gemma_from_hf(d):
    c = hf_config_object(d, "gemma")
    _reject_unless(c, "use_bidirectional_attention", (False,))
    return _llama_like_from_hf(c, **_gemma_extra(c.hidden_size))


def gemma_to_hf(cfg):
    return _llama_like_to_hf(cfg)


def gemma2_from_hf(d):
    c = hf_config_object(d, "gemma2")
    _reject_unless(c, "use_bidirectional_attention", (False,))
    return _llama_like_from_hf(
        c, act_key="hidden_activation", layer_types=True, block="peri_ln",
        attn_softcap=None if c.attn_logit_softcapping is None else float(c.attn_logit_softcapping),
        logit_softcap=None if c.final_logit_softcapping is None else float(c.final_logit_softcapping),
        attn_scale=c.query_pre_attn_scalar ** -0.5, **_gemma_extra(c.hidden_size))


def gemma2_to_hf(cfg):
    d = _llama_like_to_hf(cfg, act_key="hidden_activation")
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
    types = _layer_types_to_hf(cfg)
    d.update(layer_types=types, sliding_window=cfg.sliding_window or cfg.max_seq_len,
             attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
             query_pre_attn_scalar=round(scale ** -2))
    return d


def gemma2_map():
    m = llama_map()
    L = "model.layers.{i}."
    m.update({L + "post_attention_layernorm.weight": "layers.{i}.post_attn_norm.weight",
              L + "pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.weight",
              L + "post_feedforward_layernorm.weight": "layers.{i}.post_mlp_norm.weight"})
    return m


class _RopeOnly:                       # the attributes _rope_from_hf reads, for one layer type's parameters
    def __init__(self, rp):
        self.rope_parameters, self.layer_types = rp, None


def gemma3_from_hf(d):
    c = hf_config_object(d, "gemma3_text")
    _reject_unless(c, "use_bidirectional_attention", (False,))
    rp = c.rope_parameters
    local = dict(rp["sliding_attention"])
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"rope_type {local['rope_type']!r} on sliding layers is not supported "
                                    "(Forge rotates local layers by rope_theta_local, unscaled)")
    return _llama_like_from_hf(
        c, act_key="hidden_activation", layer_types=True, block="peri_ln", qk_norm="head",
        attn_softcap=None if c.attn_logit_softcapping is None else float(c.attn_logit_softcapping),
        logit_softcap=None if c.final_logit_softcapping is None else float(c.final_logit_softcapping),
        attn_scale=c.query_pre_attn_scalar ** -0.5, **_gemma_extra(c.hidden_size),
        rope=_rope_from_hf(_RopeOnly(dict(rp["full_attention"])), partial_ok=False),
        rope_theta_local=float(local["rope_theta"]))


def gemma3_to_hf(cfg):
    d = gemma2_to_hf(cfg)
    full = d["rope_parameters"]
    local = ({"rope_type": "default", "rope_theta": cfg.rope_theta_local} if cfg.rope_theta_local is not None
             else dict(full))
    d["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    return d
