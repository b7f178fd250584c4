"""The Llama-style families and the wiring they share (RMSNorm, GLU MLP, q/k/v/o projections under
model.layers.{i}): Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, BitNet b1.58. `llama_map`,
`_llama_like_from_hf` and `_llama_like_to_hf` are also the base of the Gemma, OLMo, MoE and DeepSeek-V3
families.
"""
from __future__ import annotations

from forge.config import ModelConfig, QuantConfig
from forge.models.hf.common import (UnsupportedModelError, _act_from_hf, _act_to_hf, _base, _common_to_hf, _get,
                                    _layer_types_to_hf, _layers_from_hf, _rope_from_hf, _rope_to_hf,
                                    hf_config_object)


# ---------------------------------------------------------------- the Llama-style wiring
def llama_map(p: str = "model.") -> dict[str, str]:
    L = p + "layers.{i}."
    m = {p + "embed_tokens.weight": "embed.tok.weight", p + "norm.weight": "norm.weight",
         "lm_head.weight": "head.proj.weight",
         L + "input_layernorm.weight": "layers.{i}.attn_norm.weight",
         L + "post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
         L + "self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
         L + "self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight"}
    for hf, fg in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
        for s in ("weight", "bias"):
            m[f"{L}self_attn.{hf}.{s}"] = f"layers.{{i}}.attn.{fg}.{s}"
    for hf, fg in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_out")):
        for s in ("weight", "bias"):
            m[f"{L}mlp.{hf}.{s}"] = f"layers.{{i}}.mlp.{fg}.{s}"
    return m


LLAMA_IGNORE = (r".*rotary_emb\.inv_freq$",)


def _llama_like_from_hf(c, *, act_key="hidden_act", eps_key="rms_norm_eps", qkv_bias=None, out_bias=None,
                        sliding=False, layer_types=False, rope=None, **extra) -> ModelConfig:
    d = _base(c)
    attention_bias = bool(_get(c, "attention_bias", False))
    d.update(_rope_from_hf(c, partial_ok=False) if rope is None else rope)
    d.update(mlp="glu", activation=_act_from_hf(_get(c, act_key, "silu")), d_ff=c.intermediate_size,
             mlp_bias=bool(_get(c, "mlp_bias", False)), norm="rmsnorm", norm_eps=float(_get(c, eps_key, 1e-6)),
             qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
             attn_out_bias=attention_bias if out_bias is None else out_bias,
             attn_dropout=float(_get(c, "attention_dropout", 0.0)))
    if layer_types:
        d.update(_layers_from_hf(c, d["n_layers"]))
    elif sliding and _get(c, "sliding_window", None) and c.sliding_window < c.max_position_embeddings:
        d.update(attention="sliding", sliding_window=int(c.sliding_window))
    d.update(extra)
    return ModelConfig(**d).validate()


def _llama_like_to_hf(cfg: ModelConfig, *, attention_bias=True, mlp_bias=False, act_key="hidden_act",
                      eps_key="rms_norm_eps", tanh_name="gelu_pytorch_tanh") -> dict:
    d = _common_to_hf(cfg)
    d.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
             attention_dropout=cfg.attn_dropout, **_rope_to_hf(cfg))
    d[act_key] = _act_to_hf(cfg.activation, tanh_name)
    if eps_key:
        d[eps_key] = cfg.norm_eps
    if attention_bias:
        d["attention_bias"] = cfg.qkv_bias
    if mlp_bias:
        d["mlp_bias"] = cfg.up_bias and cfg.down_bias   # one switch there: representable when both agree
    return d


# ---------------------------------------------------------------- Llama, Mistral, Qwen2, Qwen3
def llama_from_hf(d):
    c = hf_config_object(d, "llama")
    return _llama_like_from_hf(c)


def llama_to_hf(cfg):
    return _llama_like_to_hf(cfg, mlp_bias=True)


def mistral_from_hf(d):
    return _llama_like_from_hf(hf_config_object(d, "mistral"), qkv_bias=False, out_bias=False, sliding=True)


def mistral_to_hf(cfg):
    d = _llama_like_to_hf(cfg, attention_bias=False)
    kinds = {cfg.layer_attention(i) for i in range(cfg.n_layers)}
    d["sliding_window"] = cfg.sliding_window if kinds == {"sliding"} else None
    return d


def _qwen_layers_to_hf(cfg, d):
    types = _layer_types_to_hf(cfg)
    sliding = "sliding_attention" in types
    d.update(layer_types=types, use_sliding_window=sliding, sliding_window=cfg.sliding_window if sliding else None,
             max_window_layers=types.index("sliding_attention") if sliding else cfg.n_layers)
    return d


def qwen2_from_hf(d):
    return _llama_like_from_hf(hf_config_object(d, "qwen2"), qkv_bias=True, out_bias=False, layer_types=True)


def qwen2_to_hf(cfg):
    return _qwen_layers_to_hf(cfg, _llama_like_to_hf(cfg, attention_bias=False))


def qwen3_from_hf(d):
    return _llama_like_from_hf(hf_config_object(d, "qwen3"), layer_types=True, qk_norm="head")


def qwen3_to_hf(cfg):
    return _qwen_layers_to_hf(cfg, _llama_like_to_hf(cfg))


# ---------------------------------------------------------------- SmolLM3
def _cycle(per_layer: list[str]):
    """Per-layer keys -> (the key, None) when all agree, else (None, the shortest cycle reproducing them)."""
    if len(set(per_layer)) == 1:
        return per_layer[0], None
    p = next(p for p in range(1, len(per_layer) + 1)
             if all(per_layer[i] == per_layer[i % p] for i in range(len(per_layer))))
    return None, per_layer[:p]


def smollm3_from_hf(d):
    c = hf_config_object(d, "smollm3")
    n = c.num_hidden_layers
    uses = list(_get(c, "no_rope_layers", [1] * n))[:n]           # 1 = RoPE, 0 = NoPE (per layer)
    position, pattern = _cycle(["rope" if u else "none" for u in uses])
    extra = dict(position="none", position_pattern=None) if position == "none" else \
        dict(position="rope", position_pattern=pattern)
    if not _get(c, "use_sliding_window", False):                  # layer_types only bind with it on
        c.layer_types = ["full_attention"] * n
    return _llama_like_from_hf(c, layer_types=True, **extra)


def smollm3_to_hf(cfg):
    d = _llama_like_to_hf(cfg, mlp_bias=True)
    types = _layer_types_to_hf(cfg)
    sliding = "sliding_attention" in types
    d.update(no_rope_layers=[int(cfg.layer_position(i) == "rope") for i in range(cfg.n_layers)],
             layer_types=types, use_sliding_window=sliding, sliding_window=cfg.sliding_window if sliding else None)
    bad = sorted({cfg.layer_position(i) for i in range(cfg.n_layers)} - {"rope", "none"})
    if bad:
        raise UnsupportedModelError(f"per-layer positions {bad} have no SmolLM3 equivalent (rope or none)")
    return d


# ---------------------------------------------------------------- Granite
def granite_from_hf(d):
    """Llama wiring with four scalars: embeddings x embedding_multiplier, each residual branch x
    residual_multiplier, attention scores x attention_multiplier (the whole scale, not hd^-0.5
    times it), logits / logits_scaling."""
    c = hf_config_object(d, "granite")
    return _llama_like_from_hf(c, embed_scale=float(c.embedding_multiplier),
                               residual_multiplier=float(c.residual_multiplier),
                               attn_scale=float(c.attention_multiplier), logit_divisor=float(c.logits_scaling))


def granite_to_hf(cfg):
    d = _llama_like_to_hf(cfg, mlp_bias=True)
    d.update(embedding_multiplier=cfg.embed_scale, residual_multiplier=cfg.residual_multiplier,
             attention_multiplier=cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5,
             logits_scaling=cfg.logit_divisor)
    return d


# ---------------------------------------------------------------- BitNet b1.58
# quantization_config of a BitNet checkpoint whose linears hold full-precision weights that transformers
# quantises in every forward (AutoBitLinear, online): what model.quant.linear='bitlinear_1p58' computes
BITNET_ONLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


def _bitnet_quant_from_hf(q) -> QuantConfig:
    """No quantization_config: plain linears. AutoBitLinear online (full-precision weights quantised
    in the forward), or packed offline codes (AutoBitLinear offline, BitLinear; unpacked by
    forge.models.hf.quantized.bitnet_offline_to_master into weights that quantise back to them):
    model.quant.linear='bitlinear_1p58'. An RMSNorm inside the linears, or converted heads, refused."""
    if not q:
        return QuantConfig()
    q = q if isinstance(q, dict) else q.to_dict()
    known = q.get("quant_method") == "bitnet" and q.get("linear_class", "bitlinear") in ("bitlinear", "autobitlinear")
    online = q.get("quantization_mode", "offline") == "online"
    if (not known or q.get("use_rms_norm") or q.get("modules_to_not_convert") not in (None, ["lm_head"])
            or (online and q.get("linear_class", "bitlinear") != "autobitlinear")):
        raise UnsupportedModelError(
            f"BitNet quantization_config {q} is not supported: Forge reads {BITNET_ONLINE} (full-precision "
            f"weights) and packed offline codes (linear_class bitlinear / autobitlinear), with use_rms_norm "
            f"false and only lm_head unconverted, as model.quant.linear='bitlinear_1p58'")
    return QuantConfig(linear="bitlinear_1p58")


def bitnet_from_hf(d):
    """Llama wiring with a relu2 GLU and two sub-norms, RMSNorms over the heads' output before
    o_proj (attn_sub_norm) and over the GLU hidden before down_proj (ffn_sub_norm); its
    quantization_config (online AutoBitLinear) -> model.quant.linear."""
    c = hf_config_object(d, "bitnet")
    return _llama_like_from_hf(c, attn_sub_norm="rmsnorm", mlp_sub_norm="rmsnorm",
                               quant=_bitnet_quant_from_hf(d.get("quantization_config")))


def bitnet_to_hf(cfg):
    d = _llama_like_to_hf(cfg)
    d.pop("head_dim")                      # BitNet's heads are hidden_size / num_attention_heads wide
    if cfg.quant.linear == "bitlinear_1p58":
        d["quantization_config"] = dict(BITNET_ONLINE)
    return d


def bitnet_map():
    L, F = "model.layers.{i}.", "layers.{i}."
    return {**llama_map(), L + "self_attn.attn_sub_norm.weight": F + "attn.sub_norm.weight",
            L + "mlp.ffn_sub_norm.weight": F + "mlp.sub_norm.weight"}
