"""The OLMo families: OLMo (non-parametric LayerNorm, q/k/v clamp) and OLMo 2 (norms after attention
and MLP, full-width q/k norms). OLMoE is in moe.py.
"""
from __future__ import annotations

from forge.models.hf.common import _get, hf_config_object
from forge.models.hf.llama import _llama_like_from_hf, _llama_like_to_hf, llama_map


def olmo_from_hf(d):
    c = hf_config_object(d, "olmo")
    clip = _get(c, "clip_qkv", None)
    return _llama_like_from_hf(c, norm="nonparam_layernorm", norm_eps=1e-5,    # OlmoLayerNorm: eps fixed
                               qkv_clip=None if clip is None else float(clip))


def olmo_to_hf(cfg):
    d = _llama_like_to_hf(cfg, eps_key=None)
    d["clip_qkv"] = cfg.qkv_clip
    return d


def olmo2_from_hf(d):
    c = hf_config_object(d, "olmo2")
    return _llama_like_from_hf(c, block="norm_after", qk_norm="full")


def olmo2_to_hf(cfg):
    return _llama_like_to_hf(cfg)


def olmo2_map():
    m = llama_map()
    L = "model.layers.{i}."
    m.update({L + "post_attention_layernorm.weight": "layers.{i}.post_attn_norm.weight",
              L + "post_feedforward_layernorm.weight": "layers.{i}.post_mlp_norm.weight"})
    return m
