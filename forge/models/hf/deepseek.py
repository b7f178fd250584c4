"""The DeepSeek-V3 family (transformers' DeepseekV3ForCausalLM): multi-head latent attention
(model.attention='mla', forge.models.layers.mla) and a mixture of experts with a sigmoid router,
group-limited top-k, the aux-loss-free selection bias, a routed scaling factor, shared experts and
dense first layers. Registered in families.FAMILIES.

Config mapping (HF -> Forge): q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
v_head_dim -> the same model.* keys; rope_interleave -> model.rope_interleaved; attention_bias ->
model.qkv_bias (the down-projections q_a_proj, kv_a_proj_with_mqa) and model.attn_out_bias;
n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_shared_experts (each of
moe_intermediate_size), first_k_dense_replace, n_group, topk_group, routed_scaling_factor,
norm_topk_prob -> model.moe.*; e_score_correction_bias is the router's expert_bias buffer, so
model.moe.bias_update_rate > 0 (DeepSeek-V3's update speed, 0.001, when converting from HF).
YaRN with DeepSeek's mscale / mscale_all_dim (m(f, a) = 0.1 a ln f + 1): cos and sin are scaled
by m(f, mscale) / m(f, mscale_all_dim) (model.rope_attention_factor) and the softmax scale is
(n + r)^-0.5 m(f, mscale_all_dim)^2 (model.attn_scale).
Tensors: the attention's q_proj | q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj are Forge's wq | wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo with
the same layouts (q_b_proj rows per head [nope | rope], kv_b_proj rows per head [k nope | v],
kv_a_proj_with_mqa rows [latent | rope key]; interleaved rope pairs (2i, 2i+1) as stored).
Not represented: multi-token-prediction layers (DeepSeek-V3's model.layers.61.*, ignored on input as
transformers does) and num_key_value_heads != num_attention_heads (transformers' MLA needs equal).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

from forge.config import ModelConfig, MoEConfig
from forge.models.hf.common import (FamilySpec, UnsupportedModelError, _get, _rope_from_hf, _rope_to_hf,
                                    hf_config_object)
from forge.models.hf.llama import LLAMA_IGNORE, _llama_like_from_hf, _llama_like_to_hf, llama_map
from forge.models.hf.moe import stacked_experts

BIAS_UPDATE_RATE = 0.001      # DeepSeek-V3's bias update speed (gamma), used when converting from HF


def yarn_mscale(factor: float, m) -> float:
    """DeepSeek's YaRN magnitude factor 0.1 m ln(factor) + 1 (1 for factor <= 1 or m unset)."""
    return 1.0 if factor <= 1 or not m else 0.1 * m * math.log(factor) + 1.0


def _mla_rope_from_hf(c, qk_dim: int) -> tuple[dict, float | None]:
    """(Forge rope keys, the softmax scale or None) from HF rope_parameters with DeepSeek's mscales."""
    rp = dict(_get(c, "rope_parameters", {}) or {})
    m, m_all = rp.pop("mscale", None), rp.pop("mscale_all_dim", None)
    kind = rp.get("rope_type", rp.get("type", "default"))
    scale = None
    if kind != "default" and m_all:
        if kind != "yarn":
            raise UnsupportedModelError(f"mscale_all_dim with rope_type {kind!r} is not supported (only yarn)")
        factor = rp.get("factor") or c.max_position_embeddings / rp["original_max_position_embeddings"]
        rp["factor"] = factor
        if rp.get("attention_factor") is None and m:
            rp["attention_factor"] = yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
        scale = qk_dim ** -0.5 * yarn_mscale(factor, m_all) ** 2
    return _rope_from_hf(SimpleNamespace(rope_parameters=rp, layer_types=None), partial_ok=False), scale


def _mla_rope_to_hf(cfg: ModelConfig) -> dict:
    rp = _rope_to_hf(cfg)["rope_parameters"]
    if cfg.attn_scale is None:
        return rp
    ratio = math.sqrt(cfg.attn_scale / (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)   # m(f, a)
    if ratio != 1.0:
        if cfg.rope_scaling != "yarn" or cfg.rope_scaling_factor <= 1:
            raise UnsupportedModelError(f"model.attn_scale={cfg.attn_scale} other than (n + r)^-0.5 is "
                                        f"DeepseekV3's YaRN mscale_all_dim only (needs rope_scaling=yarn, factor > 1)")
        rp["mscale_all_dim"] = (ratio - 1.0) / (0.1 * math.log(cfg.rope_scaling_factor))
    return rp


def deepseek_v3_from_hf(d):
    c = hf_config_object(d, "deepseek_v3")
    heads = c.num_attention_heads
    if _get(c, "num_key_value_heads", heads) != heads:
        raise UnsupportedModelError(f"num_key_value_heads={c.num_key_value_heads} != num_attention_heads={heads}: "
                                    "transformers' DeepseekV3 attention expands its latent to every head")
    nope, rope_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
    rope, scale = _mla_rope_from_hf(c, nope + rope_dim)
    moe = MoEConfig(n_experts=c.n_routed_experts, top_k=c.num_experts_per_tok, router="sigmoid",
                    renormalize=bool(c.norm_topk_prob), d_ff=c.moe_intermediate_size,
                    first_dense=int(_get(c, "first_k_dense_replace", 0)), n_shared_experts=int(c.n_shared_experts or 0),
                    bias_update_rate=BIAS_UPDATE_RATE, n_group=int(_get(c, "n_group", 1)),
                    topk_group=int(_get(c, "topk_group", 1)), routed_scaling_factor=float(c.routed_scaling_factor))
    v = c.v_head_dim
    return _llama_like_from_hf(c, rope=rope, moe=moe, attention="mla", head_dim=v, v_head_dim=v, n_kv_heads=None,
                               q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=nope,
                               qk_rope_head_dim=rope_dim, attn_scale=scale,
                               rope_interleaved=bool(_get(c, "rope_interleave", True)))


def deepseek_v3_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    d = _llama_like_to_hf(cfg)                # attention_bias = model.qkv_bias (compared with attn_out_bias)
    d.pop("head_dim")                         # transformers sets it to qk_rope_head_dim
    d.update(num_key_value_heads=cfg.n_heads, rope_parameters=_mla_rope_to_hf(cfg),
             rope_interleave=cfg.rope_interleaved,
             q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
             qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, n_routed_experts=m.n_experts,
             num_experts_per_tok=m.top_k, moe_intermediate_size=m.d_ff,
             n_shared_experts=m.n_shared_experts, first_k_dense_replace=m.first_dense, n_group=m.n_group,
             topk_group=m.topk_group, routed_scaling_factor=m.routed_scaling_factor, norm_topk_prob=m.renormalize,
             num_nextn_predict_layers=0)
    return d


def deepseek_v3_rules():
    L, F = "model.layers.{i}.", "layers.{i}."
    key_map = {k: v for k, v in llama_map().items() if "self_attn" not in k}
    attn = {"q_proj.weight": "wq.weight", "q_a_proj.weight": "wq_a.weight", "q_a_proj.bias": "wq_a.bias",
            "q_a_layernorm.weight": "q_norm.weight", "q_b_proj.weight": "wq_b.weight",
            "kv_a_proj_with_mqa.weight": "wkv_a.weight", "kv_a_proj_with_mqa.bias": "wkv_a.bias",
            "kv_a_layernorm.weight": "kv_norm.weight", "kv_b_proj.weight": "wkv_b.weight",
            "o_proj.weight": "wo.weight", "o_proj.bias": "wo.bias"}
    key_map.update({L + "self_attn." + hf: F + "attn." + fg for hf, fg in attn.items()})
    key_map.update({L + "mlp.gate.weight": F + "mlp.router.weight",
                    L + "mlp.gate.e_score_correction_bias": F + "mlp.router.expert_bias"})
    projections = (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_out"))
    key_map.update({L + f"mlp.shared_experts.{hf}.weight": F + f"mlp.shared.{fg}.weight" for hf, fg in projections})
    transforms = [stacked_experts(L + "mlp.experts.{e}." + hf + ".weight", F + f"mlp.experts.{fg}.weight")
                  for hf, fg in projections]
    return key_map, transforms


DEEPSEEK_V3 = FamilySpec("DeepseekV3ForCausalLM", "deepseek_v3", deepseek_v3_from_hf, deepseek_v3_to_hf,
                         *deepseek_v3_rules(),
                         # the published checkpoint's multi-token-prediction module (transformers skips it too)
                         ignore=LLAMA_IGNORE + (r"model\.layers\.61\..*",), base_prefix="model.", moe=True)
