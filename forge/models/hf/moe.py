"""The mixture-of-experts families: Mixtral, Qwen2-MoE (gated shared expert), Qwen3-MoE, OLMoE and
gpt-oss (fused experts, attention sinks, clamped GLU), and the expert-stacking transform DeepSeek-V3
uses too.
"""
from __future__ import annotations

import torch

from forge.config import ModelConfig, MoEConfig
from forge.models.hf.common import (Transform, UnsupportedModelError, _get, _layer_types_to_hf, _reject_unless,
                                    hf_config_object)
from forge.models.hf.llama import (_llama_like_from_hf, _llama_like_to_hf, _qwen_layers_to_hf, llama_map,
                                   mistral_to_hf)


# ---------------------------------------------------------------- expert stacking, sparse layers
# Experts are stored per expert on disk ("...experts.{e}.w1.weight", what transformers'
# save_pretrained writes) and stacked in Forge ("layers.{i}.mlp.experts.w_gate.weight", (E, F, D)).
def _stack_to_forge(ts, cfg):
    return [torch.stack(list(ts), dim=0)]


def _stack_to_hf(ts, cfg):
    return [t.clone() for t in ts[0].unbind(0)]


def stacked_experts(hf_template: str, forge_key: str) -> Transform:
    """HF per-expert tensors ("{e}" in hf_template) <-> one Forge tensor stacked along dim 0."""
    return Transform("stack_experts", (hf_template,), (forge_key,), _stack_to_forge, _stack_to_hf)


def _moe_layer_indices(cfg: ModelConfig) -> list[int]:
    from forge.models.layers.moe import is_moe_layer
    return [i for i in range(cfg.n_layers) if is_moe_layer(cfg, i)]


def _fit_moe_layers(layers: list[int], n_layers: int) -> tuple[int, int]:
    """(first_dense, every) whose rule gives exactly `layers`, else UnsupportedModelError."""
    if not layers:
        raise UnsupportedModelError("a mixture-of-experts config without any sparse layer is not supported")
    first = layers[0]
    every = layers[1] - layers[0] if len(layers) > 1 else max(1, n_layers - first)
    if layers != list(range(first, n_layers, every)):
        raise UnsupportedModelError(f"sparse (MoE) layers {layers} are not of the form first_dense + k * every")
    return first, every


def _qwen_moe_layers_from_hf(c, n_layers: int) -> tuple[int, int]:
    step = int(_get(c, "decoder_sparse_step", 1))
    only = set(_get(c, "mlp_only_layers", []) or [])
    return _fit_moe_layers([i for i in range(n_layers) if i not in only and (i + 1) % step == 0], n_layers)


def _qwen_moe_layers_to_hf(cfg: ModelConfig) -> dict:
    sparse = set(_moe_layer_indices(cfg))
    return dict(decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layers) if i not in sparse])


def _moe_to_hf(cfg: ModelConfig, n_key: str, ff_key: str, renorm_key: str | None = "norm_topk_prob") -> dict:
    m = cfg.moe
    d = {n_key: m.n_experts, "num_experts_per_tok": m.top_k, ff_key: m.d_ff,
         "router_aux_loss_coef": m.aux_loss_coef}
    if renorm_key:
        d[renorm_key] = m.renormalize
    return d


def mixtral_from_hf(d):
    c = hf_config_object(d, "mixtral")
    moe = MoEConfig(n_experts=c.num_local_experts, top_k=c.num_experts_per_tok, renormalize=True,
                    d_ff=c.intermediate_size, aux_loss_coef=float(_get(c, "router_aux_loss_coef", 0.0)))
    return _llama_like_from_hf(c, qkv_bias=False, out_bias=False, sliding=True, moe=moe)


def mixtral_to_hf(cfg):
    d = mistral_to_hf(cfg)
    d.update(_moe_to_hf(cfg, "num_local_experts", "intermediate_size", None), router_jitter_noise=0.0)
    return d


def mixtral_rules():
    L, F = "model.layers.{i}.block_sparse_moe.", "layers.{i}.mlp."
    key_map = {**llama_map(), L + "gate.weight": F + "router.weight"}
    transforms = [stacked_experts(L + "experts.{e}." + hf + ".weight", F + f"experts.{fg}.weight")
                  for hf, fg in (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_out"))]
    return key_map, transforms


def qwen_moe_rules(shared: bool):
    L, F = "model.layers.{i}.mlp.", "layers.{i}.mlp."
    key_map = {**llama_map(), L + "gate.weight": F + "router.weight"}
    if shared:
        key_map[L + "shared_expert_gate.weight"] = F + "shared_gate.weight"
    projections = (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_out"))
    transforms = [stacked_experts(L + "experts.{e}." + hf + ".weight", F + f"experts.{fg}.weight")
                  for hf, fg in projections]
    if shared:
        key_map.update({L + f"shared_expert.{hf}.weight": F + f"shared.{fg}.weight" for hf, fg in projections})
    return key_map, transforms


def qwen2_moe_from_hf(d):
    c = hf_config_object(d, "qwen2_moe")
    n = c.num_hidden_layers
    first, every = _qwen_moe_layers_from_hf(c, n)
    moe = MoEConfig(n_experts=c.num_experts, top_k=c.num_experts_per_tok, renormalize=bool(c.norm_topk_prob),
                    d_ff=c.moe_intermediate_size, every=every, first_dense=first, n_shared_experts=1,
                    shared_d_ff=c.shared_expert_intermediate_size, shared_gate=True,
                    aux_loss_coef=float(_get(c, "router_aux_loss_coef", 0.0)))
    return _llama_like_from_hf(c, qkv_bias=bool(_get(c, "qkv_bias", True)), out_bias=False, layer_types=True,
                               moe=moe)


def qwen2_moe_to_hf(cfg):
    m = cfg.moe
    d = _qwen_layers_to_hf(cfg, _llama_like_to_hf(cfg, attention_bias=False))
    d.update(_moe_to_hf(cfg, "num_experts", "moe_intermediate_size"), **_qwen_moe_layers_to_hf(cfg),
             qkv_bias=cfg.qkv_bias,
             shared_expert_intermediate_size=m.n_shared_experts * m.shared_d_ff)
    return d


def qwen3_moe_from_hf(d):
    c = hf_config_object(d, "qwen3_moe")
    first, every = _qwen_moe_layers_from_hf(c, c.num_hidden_layers)
    moe = MoEConfig(n_experts=c.num_experts, top_k=c.num_experts_per_tok, renormalize=bool(c.norm_topk_prob),
                    d_ff=c.moe_intermediate_size, every=every, first_dense=first,
                    aux_loss_coef=float(_get(c, "router_aux_loss_coef", 0.0)))
    return _llama_like_from_hf(c, sliding=True, qk_norm="head", moe=moe)


def qwen3_moe_to_hf(cfg):
    d = _llama_like_to_hf(cfg)
    kinds = {cfg.layer_attention(i) for i in range(cfg.n_layers)}
    sliding = kinds == {"sliding"}
    d.update(_moe_to_hf(cfg, "num_experts", "moe_intermediate_size"), **_qwen_moe_layers_to_hf(cfg),
             use_sliding_window=sliding, sliding_window=cfg.sliding_window if sliding else None)
    return d


def olmoe_from_hf(d):
    c = hf_config_object(d, "olmoe")
    # OLMoE clamps q/k/v after its q/k norms; Forge clamps before them (OLMo), so only no clamp is exact
    _reject_unless(c, "clip_qkv", ())
    moe = MoEConfig(n_experts=c.num_experts, top_k=c.num_experts_per_tok, renormalize=bool(c.norm_topk_prob),
                    d_ff=c.intermediate_size, aux_loss_coef=float(_get(c, "router_aux_loss_coef", 0.0)))
    return _llama_like_from_hf(c, qk_norm="full", moe=moe)


def olmoe_to_hf(cfg):
    d = _llama_like_to_hf(cfg)
    d.update(_moe_to_hf(cfg, "num_experts", "intermediate_size"), clip_qkv=cfg.qkv_clip)
    return d


# ---------------------------------------------------------------- gpt-oss
# gpt-oss: experts fused over the expert dim, stored (in, out): gate_up_proj (E, D, 2F) with gate and up
# interleaved along the last dim (gate = [..., 0::2], up = [..., 1::2]), gate_up_proj_bias (E, 2F),
# down_proj (E, F, D), down_proj_bias (E, D); Forge's experts are (E, out, in).
def _identity(ts, cfg):
    return list(ts)


def _oss_gate_up_to_forge(ts, cfg):
    t = ts[0]
    if t.dim() == 3:
        return [t[..., 0::2].transpose(1, 2).contiguous(), t[..., 1::2].transpose(1, 2).contiguous()]
    return [t[..., 0::2].contiguous(), t[..., 1::2].contiguous()]


def _oss_gate_up_to_hf(ts, cfg):
    g, u = ts if ts[0].dim() == 2 else (t.transpose(1, 2) for t in ts)
    return [torch.stack([g, u], dim=-1).flatten(-2).contiguous()]


def gpt_oss_from_hf(d):
    c = hf_config_object(d, "gpt_oss")
    if c.swiglu_limit is None or float(_get(c, "swiglu_alpha", 1.702)) != 1.702:
        raise UnsupportedModelError(f"gpt-oss experts need swiglu_limit set and swiglu_alpha=1.702 (quick_gelu); "
                                    f"got {c.swiglu_limit}, {_get(c, 'swiglu_alpha', None)}")
    moe = MoEConfig(n_experts=c.num_local_experts, top_k=c.num_experts_per_tok, renormalize=True, router_bias=True,
                    d_ff=c.intermediate_size, aux_loss_coef=float(_get(c, "router_aux_loss_coef", 0.0)))
    return _llama_like_from_hf(c, layer_types=True, moe=moe, attention_sinks=True, activation="quick_gelu",
                               glu_limit=float(c.swiglu_limit), glu_up_offset=1.0, mlp_bias=True)


def gpt_oss_to_hf(cfg):
    d = _llama_like_to_hf(cfg)
    types = _layer_types_to_hf(cfg)
    d.update(_moe_to_hf(cfg, "num_local_experts", "intermediate_size", None), hidden_act="silu",
             layer_types=types, sliding_window=cfg.sliding_window if "sliding_attention" in types else None,
             swiglu_limit=cfg.glu_limit)
    return d


def gpt_oss_rules():
    L, F = "model.layers.{i}.", "layers.{i}."
    key_map = {k: v for k, v in llama_map().items() if ".mlp." not in k}
    key_map.update({L + "self_attn.sinks": F + "attn.sinks.weight",
                    L + "mlp.router.weight": F + "mlp.router.weight", L + "mlp.router.bias": F + "mlp.router.bias"})
    E = L + "mlp.experts."
    transforms = [
        Transform("oss_gate_up", (E + "gate_up_proj",), (F + "mlp.experts.w_gate.weight", F + "mlp.experts.w_up.weight"),
                  _oss_gate_up_to_forge, _oss_gate_up_to_hf),
        Transform("oss_gate_up_bias", (E + "gate_up_proj_bias",),
                  (F + "mlp.experts.w_gate.bias", F + "mlp.experts.w_up.bias"), _oss_gate_up_to_forge, _oss_gate_up_to_hf),
        Transform("oss_down", (E + "down_proj",), (F + "mlp.experts.w_out.weight",),
                  lambda ts, cfg: [ts[0].transpose(1, 2).contiguous()],
                  lambda ts, cfg: [ts[0].transpose(1, 2).contiguous()]),
        Transform("oss_down_bias", (E + "down_proj_bias",), (F + "mlp.experts.w_out.bias",), _identity, _identity)]
    return key_map, transforms

