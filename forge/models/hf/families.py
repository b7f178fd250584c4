"""Hugging Face families as data: one `FamilySpec` per HF architecture (`architectures[0]`).

A spec holds
  config_from_hf(hf_config_dict) -> ModelConfig    explicit field mapping (via the transformers
                                                   config class, so its defaults and legacy keys apply)
  config_to_hf(ModelConfig) -> dict                the kwargs of that config class
  key_map {hf_template: forge_template}            plain renames; "{i}" is the layer index
                                                   ("{e}" in a transform's HF key: one key per expert)
  transforms [Transform]                           tensors that need reshaping (fused / transposed),
                                                   each with a forward and an exact inverse
  ignore                                           regexes of HF non-parameter buffers (masks, inv_freq)
A rule (rename or transform) is active for a config when every Forge tensor it names exists in
that config's model; every HF tensor must be consumed by an active rule and every Forge tensor
produced by one, else the conversion fails naming the tensors (see convert.py).

Forge conventions relied on: RMSNorm scale = norm_offset + weight (Gemma weights map directly with
norm_offset=1); RoPE pairs channel halves unless rope_interleaved (GPT-J pairs (2i, 2i+1), which is
also how GPT-J's HF weights are laid out, so no permutation is needed anywhere).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from forge.config import ModelConfig, MoEConfig, QuantConfig
from forge.models.layers.position import POSITION


class UnsupportedModelError(ValueError):
    """The checkpoint or config uses something no Forge family can represent exactly."""


Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Transform:
    """HF tensors `hf` <-> Forge tensors `forge` (templates with "{i}"), exact in both directions."""
    name: str
    hf: tuple[str, ...]
    forge: tuple[str, ...]
    to_forge: Callable[[Tensors, ModelConfig], Tensors]
    to_hf: Callable[[Tensors, ModelConfig], Tensors]


@dataclass
class FamilySpec:
    architecture: str                     # HF `architectures[0]`, the registry key
    model_type: str                       # HF `model_type` (picks the transformers config class)
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    key_map: dict[str, str]
    transforms: list[Transform] = field(default_factory=list)
    ignore: tuple[str, ...] = ()          # regexes of HF buffers that are not parameters
    base_prefix: str = ""                 # prefix of the base model's keys ("model.", "transformer.", ...)
    tied_hf_keys: tuple[str, ...] = ("lm_head.weight",)   # may be present (== embedding) when tied
    aliases: dict[str, str] = field(default_factory=dict)  # other spellings of HF keys accepted on input
    moe: bool = False                     # a mixture-of-experts family (represents only MoE configs)


# ---------------------------------------------------------------- transforms
def _identity(ts, cfg):
    return list(ts)


def _transpose(ts, cfg):                     # GPT-2 Conv1D stores (in, out); Linear stores (out, in)
    return [ts[0].t().contiguous()]


def _conv1d_qkv_to_forge(ts, cfg):           # c_attn (D, 3D) Conv1D -> wq, wk, wv (D, D) Linear
    return [t.contiguous() for t in ts[0].t().chunk(3, dim=0)]


def _conv1d_qkv_to_hf(ts, cfg):                # cat of the transposes: no (3D, D) intermediate
    return [torch.cat([t.t() for t in ts], dim=1).contiguous()]


def _chunk3_to_forge(ts, cfg):               # fused bias (3D,) = [q | k | v]
    return [t.contiguous() for t in ts[0].chunk(3, dim=0)]


def _chunk3_to_hf(ts, cfg):
    return [torch.cat(ts, dim=0).contiguous()]


def _neox_qkv_to_forge(ts, cfg):
    """query_key_value rows are laid out per head: [n_heads, (q, k, v), head_dim] (x D for weights)."""
    t = ts[0]
    v = t.reshape(cfg.n_heads, 3, cfg.hd, *t.shape[1:])
    return [v[:, j].reshape(cfg.n_heads * cfg.hd, *t.shape[1:]).contiguous() for j in range(3)]


def _neox_qkv_to_hf(ts, cfg):
    rest = ts[0].shape[1:]
    parts = [t.reshape(cfg.n_heads, cfg.hd, *rest) for t in ts]
    return [torch.stack(parts, dim=1).reshape(3 * cfg.n_heads * cfg.hd, *rest).contiguous()]


def transposed(hf: str, forge: str) -> Transform:
    return Transform("conv1d_transpose", (hf,), (forge,), _transpose, _transpose)


def conv1d_qkv(hf: str, forge_prefix: str) -> Transform:
    keys = tuple(f"{forge_prefix}.{w}.weight" for w in ("wq", "wk", "wv"))
    return Transform("conv1d_qkv_split", (hf,), keys, _conv1d_qkv_to_forge, _conv1d_qkv_to_hf)


def chunk3_bias(hf: str, forge_prefix: str) -> Transform:
    keys = tuple(f"{forge_prefix}.{w}.bias" for w in ("wq", "wk", "wv"))
    return Transform("qkv_bias_split", (hf,), keys, _chunk3_to_forge, _chunk3_to_hf)


def neox_qkv(hf: str, forge_prefix: str, suffix: str) -> Transform:
    keys = tuple(f"{forge_prefix}.{w}.{suffix}" for w in ("wq", "wk", "wv"))
    return Transform("neox_qkv_split", (hf,), keys, _neox_qkv_to_forge, _neox_qkv_to_hf)


# ---------------------------------------------------------------- config helpers
HF_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
          "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "relu2": "relu2"}


def _act_from_hf(name: str) -> str:
    if name not in HF_ACT:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {sorted(HF_ACT)}")
    return HF_ACT[name]


def _act_to_hf(act: str, tanh_name: str) -> str:
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": tanh_name, "relu": "relu", "relu2": "relu2"}.get(act, act)


def hf_config_object(d: dict, model_type: str):
    """The transformers config class instance for `d` (applies class defaults and legacy keys)."""
    from transformers import CONFIG_MAPPING
    d = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version")}
    cls = CONFIG_MAPPING[model_type]
    return cls.from_dict(cls._decode_special_floats(d))     # config.json spells inf {"__float__": "Infinity"}


def _get(c, name, default=None):
    v = getattr(c, name, None)
    return default if v is None else v


def _base(c) -> dict:
    heads = c.num_attention_heads
    return dict(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=heads,
                n_kv_heads=_get(c, "num_key_value_heads", heads),
                head_dim=_get(c, "head_dim", c.hidden_size // heads),
                max_seq_len=c.max_position_embeddings, tie_embeddings=bool(_get(c, "tie_word_embeddings", False)),
                init_std=float(_get(c, "initializer_range", 0.02)))


def _rope_from_hf(c, partial_ok: bool) -> dict:
    rp = dict(_get(c, "rope_parameters", {}) or {})
    layer_types = _get(c, "layer_types", []) or []
    nested = [k for k in rp if k in layer_types]
    if nested:
        first = rp[nested[0]]
        if any(rp[k] != first for k in nested):
            raise UnsupportedModelError(f"per-layer-type rope_parameters that differ are not supported: {rp}")
        rp = dict(first)
    kind = rp.get("rope_type", rp.get("type", "default"))
    pct = float(rp.get("partial_rotary_factor", 1.0))
    if pct != 1.0 and not partial_ok:
        raise UnsupportedModelError(f"partial_rotary_factor={pct} is not used by this family's HF model")
    out = dict(position="rope", rope_theta=float(rp.get("rope_theta", 10000.0)), rotary_pct=pct)
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(rp["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(rp["factor"]),
                "rope_low_freq_factor": float(rp["low_freq_factor"]),
                "rope_high_freq_factor": float(rp["high_freq_factor"]),
                "rope_original_max_seq_len": int(rp["original_max_position_embeddings"])}
    if kind == "yarn":
        if rp.get("mscale") or rp.get("mscale_all_dim"):
            raise UnsupportedModelError(f"yarn's mscale / mscale_all_dim are not supported: {rp}")
        if rp.get("factor") is None:
            raise UnsupportedModelError(f"yarn without a factor is not supported: {rp}")
        af = rp.get("attention_factor")
        return {**out, "rope_scaling": "yarn", "rope_scaling_factor": float(rp["factor"]),
                "rope_original_max_seq_len": int(rp["original_max_position_embeddings"]),
                "rope_yarn_beta_fast": float(rp.get("beta_fast") or 32.0),
                "rope_yarn_beta_slow": float(rp.get("beta_slow") or 1.0),
                "rope_yarn_truncate": bool(rp.get("truncate", True)),
                "rope_attention_factor": None if af is None else float(af)}
    raise UnsupportedModelError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3, yarn)")


def _rope_to_hf(cfg: ModelConfig, partial: bool = False) -> dict:
    rp = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if partial:
        rp["partial_rotary_factor"] = cfg.rotary_pct
    if cfg.rope_scaling in ("linear", "llama3", "yarn"):
        rp["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "yarn":
        rp.update(original_max_position_embeddings=cfg.rope_original_max_seq_len, beta_fast=cfg.rope_yarn_beta_fast,
                  beta_slow=cfg.rope_yarn_beta_slow, truncate=cfg.rope_yarn_truncate)
        if cfg.rope_attention_factor is not None:
            rp["attention_factor"] = cfg.rope_attention_factor
    if cfg.rope_scaling == "llama3":
        rp.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                  original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return {"rope_parameters": rp}


def _compress(pattern: list[str]):
    """Per-layer kinds -> (attention, attention_pattern) with the shortest cycle that reproduces them."""
    if len(set(pattern)) == 1:
        return pattern[0], None
    for p in range(1, len(pattern) + 1):
        if all(pattern[i] == pattern[i % p] for i in range(len(pattern))):
            return "causal", pattern[:p]
    return "causal", pattern


_LAYER_KIND = {"full_attention": "causal", "sliding_attention": "sliding"}


def _layers_from_hf(c, n_layers: int) -> dict:
    """attention / attention_pattern / sliding_window from HF `layer_types` + `sliding_window`."""
    types = list(_get(c, "layer_types", None) or ["full_attention"] * n_layers)
    bad = sorted(set(types) - set(_LAYER_KIND))
    if bad:
        raise UnsupportedModelError(f"layer_types {bad} are not supported (supported: {sorted(_LAYER_KIND)})")
    kinds = [_LAYER_KIND[t] for t in types]
    window = _get(c, "sliding_window", None)
    if not window or window >= c.max_position_embeddings:   # no window, or one that never binds
        kinds = ["causal"] * len(kinds)
    attention, pattern = _compress(kinds)
    return dict(attention=attention, attention_pattern=pattern,
                sliding_window=int(window) if "sliding" in kinds else None)


def _layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    inv = {v: k for k, v in _LAYER_KIND.items()}
    kinds = [cfg.layer_attention(i) for i in range(cfg.n_layers)]
    bad = sorted(set(kinds) - set(inv))
    if bad:
        raise UnsupportedModelError(f"attention kinds {bad} have no Hugging Face equivalent")
    return [inv[k] for k in kinds]


def _common_to_hf(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std)


def _reject_unless(c, key: str, allowed: tuple) -> None:
    v = getattr(c, key, None)
    if v is not None and v not in allowed:
        raise UnsupportedModelError(f"{key}={v!r} is not supported (supported: {list(allowed)} or null)")


# ---------------------------------------------------------------- Llama-style families
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
    d.update(num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, intermediate_size=cfg.ff_dim,
             attention_dropout=cfg.attn_dropout, **_rope_to_hf(cfg))
    d[act_key] = _act_to_hf(cfg.activation, tanh_name)
    if eps_key:
        d[eps_key] = cfg.norm_eps
    if attention_bias:
        d["attention_bias"] = cfg.qkv_bias
    if mlp_bias:
        d["mlp_bias"] = cfg.up_bias and cfg.down_bias   # one switch there: representable when both agree
    return d


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
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.hd ** -0.5
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


# ---------------------------------------------------------------- GPT-style families
GPT2_IGNORE = (r".*\.attn\.bias$", r".*\.attn\.masked_bias$")


def gpt2_from_hf(d):
    c = hf_config_object(d, "gpt2")
    if _get(c, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedModelError("scale_attn_by_inverse_layer_idx=True is not supported")
    if _get(c, "add_cross_attention", False):
        raise UnsupportedModelError("add_cross_attention=True is not supported")
    D = c.n_embd
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=D, n_layers=c.n_layer, n_heads=c.n_head, n_kv_heads=c.n_head,
        head_dim=D // c.n_head, max_seq_len=c.n_positions, position="learned", norm="layernorm",
        norm_eps=float(c.layer_norm_epsilon), norm_bias=True, mlp="mlp", activation=_act_from_hf(c.activation_function),
        d_ff=c.n_inner or 4 * D, mlp_bias=True, qkv_bias=True, attn_out_bias=True,
        attn_scale=None if _get(c, "scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(_get(c, "tie_word_embeddings", True)), init_std=float(c.initializer_range),
        dropout=float(c.resid_pdrop), attn_dropout=float(c.attn_pdrop)).validate()


def gpt2_to_hf(cfg):
    scale_weights = cfg.attn_scale is None or cfg.attn_scale == cfg.hd ** -0.5
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_positions=cfg.max_seq_len, n_inner=cfg.ff_dim, layer_norm_epsilon=cfg.norm_eps,
                activation_function=_act_to_hf(cfg.activation, "gelu_new"),
                scale_attn_weights=scale_weights, tie_word_embeddings=cfg.tie_embeddings,
                initializer_range=cfg.init_std, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                attn_pdrop=cfg.attn_dropout)


def gpt2_rules():
    H, L = "transformer.", "transformer.h.{i}."
    key_map = {H + "wte.weight": "embed.tok.weight", H + "wpe.weight": "embed.pos.weight",
               H + "ln_f.weight": "norm.weight", H + "ln_f.bias": "norm.bias", "lm_head.weight": "head.proj.weight",
               L + "ln_1.weight": "layers.{i}.attn_norm.weight", L + "ln_1.bias": "layers.{i}.attn_norm.bias",
               L + "ln_2.weight": "layers.{i}.mlp_norm.weight", L + "ln_2.bias": "layers.{i}.mlp_norm.bias",
               L + "attn.c_proj.bias": "layers.{i}.attn.wo.bias",
               L + "mlp.c_fc.bias": "layers.{i}.mlp.w_in.bias", L + "mlp.c_proj.bias": "layers.{i}.mlp.w_out.bias"}
    transforms = [conv1d_qkv(L + "attn.c_attn.weight", "layers.{i}.attn"),
                  chunk3_bias(L + "attn.c_attn.bias", "layers.{i}.attn"),
                  transposed(L + "attn.c_proj.weight", "layers.{i}.attn.wo.weight"),
                  transposed(L + "mlp.c_fc.weight", "layers.{i}.mlp.w_in.weight"),
                  transposed(L + "mlp.c_proj.weight", "layers.{i}.mlp.w_out.weight")]
    return key_map, transforms


def neox_from_hf(d):
    c = hf_config_object(d, "gpt_neox")
    bias = bool(_get(c, "attention_bias", True))
    parallel = bool(_get(c, "use_parallel_residual", True))
    return ModelConfig(
        **_base(c), **_rope_from_hf(c, partial_ok=True), norm="layernorm", norm_eps=float(c.layer_norm_eps),
        norm_bias=True, mlp="mlp", activation=_act_from_hf(c.hidden_act), d_ff=c.intermediate_size, mlp_bias=True,
        qkv_bias=bias, attn_out_bias=bias, block="parallel" if parallel else "pre_ln", parallel_shared_norm=False,
        dropout=float(_get(c, "hidden_dropout", 0.0)), attn_dropout=float(_get(c, "attention_dropout", 0.0)),
    ).validate()


def neox_to_hf(cfg):
    d = _common_to_hf(cfg)
    d.update(intermediate_size=cfg.ff_dim, hidden_act=_act_to_hf(cfg.activation, "gelu_new"),
             layer_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias, use_parallel_residual=cfg.block == "parallel",
             hidden_dropout=cfg.dropout, attention_dropout=cfg.attn_dropout, **_rope_to_hf(cfg, partial=True))
    return d


def neox_rules():
    H, L = "gpt_neox.", "gpt_neox.layers.{i}."
    key_map = {H + "embed_in.weight": "embed.tok.weight", "embed_out.weight": "head.proj.weight",
               H + "final_layer_norm.weight": "norm.weight", H + "final_layer_norm.bias": "norm.bias"}
    for hf, fg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"),
                   ("attention.dense", "attn.wo"), ("mlp.dense_h_to_4h", "mlp.w_in"),
                   ("mlp.dense_4h_to_h", "mlp.w_out")):
        for s in ("weight", "bias"):
            key_map[f"{L}{hf}.{s}"] = f"layers.{{i}}.{fg}.{s}"
    transforms = [neox_qkv(L + "attention.query_key_value.weight", "layers.{i}.attn", "weight"),
                  neox_qkv(L + "attention.query_key_value.bias", "layers.{i}.attn", "bias")]
    return key_map, transforms


def gptj_from_hf(d):
    c = hf_config_object(d, "gptj")
    D, H = c.n_embd, c.n_head
    hd = D // H
    if not c.rotary_dim:
        raise UnsupportedModelError("GPT-J with rotary_dim=null is not supported")
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=D, n_layers=c.n_layer, n_heads=H, n_kv_heads=H, head_dim=hd,
        max_seq_len=c.n_positions, position="rope", rope_theta=10000.0, rotary_pct=c.rotary_dim / hd,
        rope_interleaved=True, norm="layernorm", norm_eps=float(c.layer_norm_epsilon), norm_bias=True,
        mlp="mlp", activation=_act_from_hf(c.activation_function), d_ff=c.n_inner or 4 * D, mlp_bias=True,
        block="parallel", parallel_shared_norm=True, head_bias=True,
        tie_embeddings=bool(_get(c, "tie_word_embeddings", False)), init_std=float(c.initializer_range),
        dropout=float(c.resid_pdrop), attn_dropout=float(c.attn_pdrop)).validate()


def gptj_to_hf(cfg):
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_positions=cfg.max_seq_len, n_inner=cfg.ff_dim, rotary_dim=cfg.rotary_dim,
                layer_norm_epsilon=cfg.norm_eps, activation_function=_act_to_hf(cfg.activation, "gelu_new"),
                tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout)


def gptj_map():
    H, L = "transformer.", "transformer.h.{i}."
    m = {H + "wte.weight": "embed.tok.weight", H + "ln_f.weight": "norm.weight", H + "ln_f.bias": "norm.bias",
         "lm_head.weight": "head.proj.weight", "lm_head.bias": "head.proj.bias",
         L + "ln_1.weight": "layers.{i}.attn_norm.weight", L + "ln_1.bias": "layers.{i}.attn_norm.bias",
         L + "attn.q_proj.weight": "layers.{i}.attn.wq.weight", L + "attn.k_proj.weight": "layers.{i}.attn.wk.weight",
         L + "attn.v_proj.weight": "layers.{i}.attn.wv.weight", L + "attn.out_proj.weight": "layers.{i}.attn.wo.weight"}
    for hf, fg in (("fc_in", "w_in"), ("fc_out", "w_out")):
        for s in ("weight", "bias"):
            m[f"{L}mlp.{hf}.{s}"] = f"layers.{{i}}.mlp.{fg}.{s}"
    return m


def phi_from_hf(d):
    c = hf_config_object(d, "phi")
    return ModelConfig(
        **_base(c), **_rope_from_hf(c, partial_ok=True), norm="layernorm", norm_eps=float(c.layer_norm_eps),
        norm_bias=True, mlp="mlp", activation=_act_from_hf(c.hidden_act), d_ff=c.intermediate_size, mlp_bias=True,
        qkv_bias=True, attn_out_bias=True, block="parallel", parallel_shared_norm=True, head_bias=True,
        qk_norm="head" if _get(c, "qk_layernorm", False) else "none",
        dropout=float(_get(c, "resid_pdrop", 0.0)), attn_dropout=float(_get(c, "attention_dropout", 0.0)),
    ).validate()


def phi_to_hf(cfg):
    d = _common_to_hf(cfg)
    d.update(num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ff_dim,
             hidden_act=_act_to_hf(cfg.activation, "gelu_new"), layer_norm_eps=cfg.norm_eps,
             qk_layernorm=cfg.qk_norm == "head", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
             attention_dropout=cfg.attn_dropout, **_rope_to_hf(cfg, partial=True))
    return d


def phi_map():
    L = "model.layers.{i}."
    m = {"model.embed_tokens.weight": "embed.tok.weight", "lm_head.weight": "head.proj.weight",
         "lm_head.bias": "head.proj.bias"}
    for hf, fg in (("model.final_layernorm", "norm"), (L + "input_layernorm", "layers.{i}.attn_norm"),
                   (L + "self_attn.q_proj", "layers.{i}.attn.wq"), (L + "self_attn.k_proj", "layers.{i}.attn.wk"),
                   (L + "self_attn.v_proj", "layers.{i}.attn.wv"), (L + "self_attn.dense", "layers.{i}.attn.wo"),
                   (L + "self_attn.q_layernorm", "layers.{i}.attn.q_norm"),
                   (L + "self_attn.k_layernorm", "layers.{i}.attn.k_norm"),
                   (L + "mlp.fc1", "layers.{i}.mlp.w_in"), (L + "mlp.fc2", "layers.{i}.mlp.w_out")):
        for s in ("weight", "bias"):
            m[f"{hf}.{s}"] = f"{fg}.{s}"
    return m



# ---------------------------------------------------------------- SmolLM3, Gemma 3, Phi-3
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


def _phi3_qkv_to_forge(ts, cfg):             # qkv_proj rows = [q (H*hd) | k (Hkv*hd) | v (Hkv*hd)]
    q, kv = cfg.n_heads * cfg.hd, cfg.kv_heads * cfg.hd
    return [t.contiguous() for t in ts[0].split([q, kv, kv], dim=0)]


def _chunk2_to_forge(ts, cfg):               # gate_up_proj rows = [gate (F) | up (F)]
    return [t.contiguous() for t in ts[0].chunk(2, dim=0)]


def phi3_from_hf(d):
    c = hf_config_object(d, "phi3")
    kind = (c.rope_parameters or {}).get("rope_type", "default")
    if kind != "default":
        raise UnsupportedModelError(f"Phi-3 rope_type {kind!r} (long-context LongRoPE) is not supported yet; "
                                    "supported: default (the 4k-context models)")
    d = _base(c)
    d.update(_rope_from_hf(c, partial_ok=True))
    d.update(mlp="glu", activation=_act_from_hf(c.hidden_act), d_ff=c.intermediate_size, norm="rmsnorm",
             norm_eps=float(c.rms_norm_eps), dropout=float(_get(c, "resid_pdrop", 0.0)),
             attn_dropout=float(_get(c, "attention_dropout", 0.0)))
    if _get(c, "sliding_window", None) and c.sliding_window < c.max_position_embeddings:
        d.update(attention="sliding", sliding_window=int(c.sliding_window))
    return ModelConfig(**d).validate()


def phi3_to_hf(cfg):
    d = _common_to_hf(cfg)
    kinds = {cfg.layer_attention(i) for i in range(cfg.n_layers)}
    d.update(num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ff_dim, rms_norm_eps=cfg.norm_eps,
             hidden_act=_act_to_hf(cfg.activation, "gelu_pytorch_tanh"), resid_pdrop=cfg.dropout,
             embd_pdrop=cfg.dropout, attention_dropout=cfg.attn_dropout,
             original_max_position_embeddings=cfg.max_seq_len,
             sliding_window=cfg.sliding_window if kinds == {"sliding"} else None, **_rope_to_hf(cfg, partial=True))
    return d


def phi3_rules():
    L, F = "model.layers.{i}.", "layers.{i}."
    key_map = {"model.embed_tokens.weight": "embed.tok.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "head.proj.weight",
               L + "input_layernorm.weight": F + "attn_norm.weight",
               L + "post_attention_layernorm.weight": F + "mlp_norm.weight",
               L + "self_attn.o_proj.weight": F + "attn.wo.weight", L + "mlp.down_proj.weight": F + "mlp.w_out.weight"}
    transforms = [
        Transform("phi3_qkv_split", (L + "self_attn.qkv_proj.weight",),
                  tuple(F + f"attn.{w}.weight" for w in ("wq", "wk", "wv")), _phi3_qkv_to_forge, _chunk3_to_hf),
        Transform("gate_up_split", (L + "mlp.gate_up_proj.weight",),
                  (F + "mlp.w_gate.weight", F + "mlp.w_up.weight"), _chunk2_to_forge, _chunk3_to_hf)]
    return key_map, transforms


# ---------------------------------------------------------------- mixture-of-experts families
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
    d = {n_key: m.n_experts, "num_experts_per_tok": m.top_k, ff_key: m.d_ff or cfg.ff_dim,
         "router_aux_loss_coef": m.aux_loss_coef}
    if renorm_key:
        d[renorm_key] = m.renormalize
    return d


def _all_sparse(cfg: ModelConfig) -> dict:
    """Families whose every layer is sparse: the experts' size is intermediate_size."""
    return {"intermediate_size": cfg.moe.d_ff or cfg.ff_dim}


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
             shared_expert_intermediate_size=m.n_shared_experts * (m.shared_d_ff or m.d_ff or cfg.ff_dim))
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
             attention_multiplier=cfg.attn_scale if cfg.attn_scale is not None else cfg.hd ** -0.5,
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


# ---------------------------------------------------------------- the registry
def _spec(arch, model_type, from_hf, to_hf, key_map, transforms=(), ignore=LLAMA_IGNORE, base_prefix="model.",
          tied_hf_keys=("lm_head.weight",), aliases=None):
    return FamilySpec(arch, model_type, from_hf, to_hf, key_map, list(transforms), tuple(ignore), base_prefix,
                      tuple(tied_hf_keys), dict(aliases or {}))


_gpt2_map, _gpt2_tf = gpt2_rules()
_neox_map, _neox_tf = neox_rules()


# gpt-oss: experts fused over the expert dim, stored (in, out): gate_up_proj (E, D, 2F) with gate and up
# interleaved along the last dim (gate = [..., 0::2], up = [..., 1::2]), gate_up_proj_bias (E, 2F),
# down_proj (E, F, D), down_proj_bias (E, D); Forge's experts are (E, out, in).
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


def _moe_spec(arch, model_type, from_hf, to_hf, rules):
    key_map, transforms = rules
    return FamilySpec(arch, model_type, from_hf, to_hf, key_map, transforms, LLAMA_IGNORE, "model.", moe=True)

# Order matters when a Forge config must pick an HF class: the first family that represents it
# exactly wins (e.g. a plain Llama-style config becomes LlamaForCausalLM, not MistralForCausalLM).
FAMILIES: dict[str, FamilySpec] = {
    "LlamaForCausalLM": _spec("LlamaForCausalLM", "llama", llama_from_hf, llama_to_hf, llama_map()),
    "MistralForCausalLM": _spec("MistralForCausalLM", "mistral", mistral_from_hf, mistral_to_hf, llama_map()),
    "Qwen2ForCausalLM": _spec("Qwen2ForCausalLM", "qwen2", qwen2_from_hf, qwen2_to_hf, llama_map()),
    "Qwen3ForCausalLM": _spec("Qwen3ForCausalLM", "qwen3", qwen3_from_hf, qwen3_to_hf, llama_map()),
    "GemmaForCausalLM": _spec("GemmaForCausalLM", "gemma", gemma_from_hf, gemma_to_hf, llama_map()),
    "Gemma2ForCausalLM": _spec("Gemma2ForCausalLM", "gemma2", gemma2_from_hf, gemma2_to_hf, gemma2_map()),
    "OlmoForCausalLM": _spec("OlmoForCausalLM", "olmo", olmo_from_hf, olmo_to_hf, llama_map()),
    "Olmo2ForCausalLM": _spec("Olmo2ForCausalLM", "olmo2", olmo2_from_hf, olmo2_to_hf, olmo2_map()),
    "GPT2LMHeadModel": _spec("GPT2LMHeadModel", "gpt2", gpt2_from_hf, gpt2_to_hf, _gpt2_map, _gpt2_tf,
                             GPT2_IGNORE, "transformer."),
    "GPTNeoXForCausalLM": _spec("GPTNeoXForCausalLM", "gpt_neox", neox_from_hf, neox_to_hf, _neox_map, _neox_tf,
                                LLAMA_IGNORE + (r".*\.attention\.bias$", r".*\.attention\.masked_bias$"),
                                "gpt_neox.", ("embed_out.weight",),
                                # transformers 5 names the head lm_head in memory, embed_out on disk
                                {"lm_head.weight": "embed_out.weight"}),
    "GPTJForCausalLM": _spec("GPTJForCausalLM", "gptj", gptj_from_hf, gptj_to_hf, gptj_map(), (),
                             GPT2_IGNORE, "transformer."),
    "PhiForCausalLM": _spec("PhiForCausalLM", "phi", phi_from_hf, phi_to_hf, phi_map()),
    "MixtralForCausalLM": _moe_spec("MixtralForCausalLM", "mixtral", mixtral_from_hf, mixtral_to_hf,
                                    mixtral_rules()),
    "Qwen2MoeForCausalLM": _moe_spec("Qwen2MoeForCausalLM", "qwen2_moe", qwen2_moe_from_hf, qwen2_moe_to_hf,
                                     qwen_moe_rules(shared=True)),
    "Qwen3MoeForCausalLM": _moe_spec("Qwen3MoeForCausalLM", "qwen3_moe", qwen3_moe_from_hf, qwen3_moe_to_hf,
                                     qwen_moe_rules(shared=False)),
    "GptOssForCausalLM": _moe_spec("GptOssForCausalLM", "gpt_oss", gpt_oss_from_hf, gpt_oss_to_hf, gpt_oss_rules()),
    "OlmoeForCausalLM": _moe_spec("OlmoeForCausalLM", "olmoe", olmoe_from_hf, olmoe_to_hf, qwen_moe_rules(shared=False)),
    "SmolLM3ForCausalLM": _spec("SmolLM3ForCausalLM", "smollm3", smollm3_from_hf, smollm3_to_hf, llama_map()),
    "Gemma3ForCausalLM": _spec("Gemma3ForCausalLM", "gemma3_text", gemma3_from_hf, gemma3_to_hf, gemma2_map()),
    "Phi3ForCausalLM": _spec("Phi3ForCausalLM", "phi3", phi3_from_hf, phi3_to_hf, *phi3_rules()),
    "GraniteForCausalLM": _spec("GraniteForCausalLM", "granite", granite_from_hf, granite_to_hf, llama_map()),
    "BitNetForCausalLM": _spec("BitNetForCausalLM", "bitnet", bitnet_from_hf, bitnet_to_hf, bitnet_map()),
}
from forge.models.hf.deepseek import DEEPSEEK_V3  # noqa: E402  (its own module; it uses the helpers above)
FAMILIES[DEEPSEEK_V3.architecture] = DEEPSEEK_V3


from forge.models.hf.mamba2 import MAMBA2  # noqa: E402  (its own module, built on the helpers above)

FAMILIES[MAMBA2.architecture] = MAMBA2


# ---------------------------------------------------------------- representability
def canonical(cfg: ModelConfig) -> dict:
    """The fields of `cfg` that determine the function the model computes (and the max context),
    with equivalent spellings normalised (d_ff vs ff_mult, per-layer attention kinds, unused knobs)."""
    d = dataclasses.asdict(cfg)
    for k in ("preset", "dropout", "attn_dropout", "init_std", "ff_mult", "ff_multiple_of", "attention",
              "attention_pattern", "moe"):
        d.pop(k)
    d.update(d_ff=cfg.ff_dim, head_dim=cfg.hd, n_kv_heads=cfg.kv_heads, n_experts=cfg.moe.n_experts,
             layer_kinds=tuple(cfg.layer_attention(i) for i in range(cfg.n_layers)),
             attn_scale=cfg.attn_scale if cfg.attn_scale is not None else cfg.hd ** -0.5)
    if cfg.moe.n_experts:
        d.update(_moe_canonical(cfg))
    kinds = set(d["layer_kinds"])
    _mla_canonical(cfg, d, kinds)
    if "sliding" not in kinds:
        d.pop("sliding_window")
    if "local" not in kinds:
        d.pop("local_window")
    rope = ["rope_theta", "rotary_pct", "rope_interleaved", "rope_scaling", "rope_scaling_factor",
            "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len",
            "rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_truncate", "rope_attention_factor"]
    positions = tuple(cfg.layer_position(i) for i in range(cfg.n_layers))
    d.update(position=cfg.position if "embed" in POSITION[cfg.position] else None, layer_positions=positions)
    d.pop("position_pattern")
    local_rope = any(p == "rope" and k in ("sliding", "local") for p, k in zip(positions, d["layer_kinds"]))
    if not local_rope or cfg.rope_theta_local is None:
        d.pop("rope_theta_local")
        if local_rope:                        # None means: as the global layers
            d["rope_theta_local"] = None
    if not cfg.uses_rope:
        drop = rope
    elif cfg.rope_scaling == "none":
        drop = rope[4:]
    elif cfg.rope_scaling == "linear":
        drop = rope[5:]
    elif cfg.rope_scaling == "llama3":
        drop = rope[8:]
    else:                                     # yarn
        drop = rope[5:7]
    for k in drop:
        d.pop(k)
    if cfg.position == "rope":
        d["rotary_pct"] = cfg.rotary_dim      # what the model uses
    locations = ("attn", "mlp", "post", "final")
    d.update({f"norm_{loc}": cfg.norm_at(loc) for loc in locations})
    norms = {cfg.norm, *(cfg.norm_at(loc) for loc in locations)}
    d.update(mlp_up_bias=cfg.up_bias, mlp_down_bias=cfg.down_bias)
    d["quant"].pop("warmup_steps")            # a training schedule, not part of the function
    d.pop("mlp_bias")                         # what it sets is in mlp_up_bias / mlp_down_bias
    d.pop("dyt_alpha_init")                   # an initial value only
    for k in ("embed_init", "embed_init_mean", "embed_init_scale"):   # initial values only
        d.pop(k)
    if not (cfg.n_embd_wte and cfg.tie_embeddings):
        d.pop("tie_embed_proj")
    if "layernorm" not in norms:
        d.pop("norm_bias")
    if not norms & {"rmsnorm", "prmsnorm"}:
        d.pop("norm_offset")
    if "prmsnorm" not in norms:
        d.pop("prmsnorm_pct")
    if "hyperspherenorm" not in norms:
        d.pop("hsnorm_radius")
        d.pop("hsnorm_radius_learned")
    if cfg.mlp != "kan":
        d.pop("kan_degree")
    if cfg.block != "parallel":
        d.pop("parallel_shared_norm")
    _ssm_canonical(cfg, d)
    return d


# keys that only attention layers read (an all-ssm model computes the same function whatever they hold)
_ATTENTION_ONLY = ("n_heads", "n_kv_heads", "head_dim", "qk_head_dim", "v_head_dim", "attn_scale", "qkv_bias",
                   "attn_out_bias", "qk_norm", "qk_norm_scale", "qkv_clip", "attn_softcap", "attention_softmax",
                   "attention_chunk", "attention_divisor", "attention_sinks", "layer_positions")


def _ssm_canonical(cfg: ModelConfig, d: dict) -> None:
    """ssm_* keys count only with an ssm layer; attention keys only with an attention layer; the
    MLP's keys not with model.mlp=identity."""
    kinds = set(d["layer_kinds"])
    if "ssm" not in kinds:
        for k in [k for k in d if k.startswith("ssm_")]:
            d.pop(k)
    else:
        d.pop("ssm_chunk_size")               # the chunked scan is exact at any chunk size
    if kinds <= {"ssm", "identity"}:
        for k in _ATTENTION_ONLY:
            d.pop(k, None)
        for k in [k for k in d if k.startswith(("rope_", "consmax_", "polymax_", "strongermax_", "squareplus_"))]:
            d.pop(k)
        d.pop("rotary_pct", None)
    if cfg.mlp == "identity" and not cfg.moe.n_experts:
        for k in ("d_ff", "activation", "mlp_up_bias", "mlp_down_bias", "glu_limit", "glu_up_offset"):
            d.pop(k, None)


def _mla_canonical(cfg: ModelConfig, d: dict, kinds: set) -> None:
    """Latent-attention keys only where an mla layer reads them; an all-mla model's query/key width is
    qk_nope_head_dim + qk_rope_head_dim (head_dim / qk_head_dim unused), its default scale that^-0.5."""
    if "mla" not in kinds:
        for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
            d.pop(k)
    elif kinds == {"mla"}:
        for k in ("head_dim", "qk_head_dim"):
            d.pop(k)
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        d.update(v_head_dim=cfg.v_hd, attn_scale=cfg.attn_scale if cfg.attn_scale is not None else qk ** -0.5)


def _moe_canonical(cfg: ModelConfig) -> dict:
    """The MoE settings that change the function (capacity factor, loss coefficients and the bias
    update rate are training-time settings: eval is dropless; a bias buffer itself does count)."""
    m = cfg.moe
    layers = tuple(_moe_layer_indices(cfg))
    expert_ff = m.d_ff or cfg.ff_dim
    shared = m.n_shared_experts * (m.shared_d_ff or expert_ff)
    d = {"moe_layers": layers, "moe_top_k": m.top_k, "moe_router": m.router, "moe_expert_ff": expert_ff,
         "moe_renormalize": m.renormalize,
         "moe_shared_ff": shared, "moe_shared_gate": bool(shared and m.shared_gate),
         "moe_router_bias": m.bias_update_rate > 0, "moe_router_logit_bias": m.router_bias,
         # group-limited top-k restricts nothing when every group is kept
         "moe_groups": (m.n_group, m.topk_group) if m.topk_group < m.n_group else None,
         "moe_routed_scale": m.routed_scaling_factor}
    if len(layers) == cfg.n_layers:
        d["d_ff"] = None                        # no dense layer: the dense hidden size is unused
    return d


@contextlib.contextmanager
def _quiet_transformers():
    """Probing a family with a config it cannot hold makes transformers warn; keep that quiet."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def representation_errors(spec: FamilySpec, cfg: ModelConfig) -> list[str]:
    """Why `spec` cannot represent `cfg` exactly ([] when it can): round trips the config through
    config_to_hf / the transformers config class / config_from_hf and compares what matters."""
    if cfg.moe.n_experts and not spec.moe:
        return ["model.moe.n_experts > 0 (mixture of experts) has no mapping to this family"]
    if spec.moe and not cfg.moe.n_experts:
        return [f"model.moe.n_experts=0 (dense) but {spec.architecture} is a mixture-of-experts family"]
    try:
        with _quiet_transformers():
            back = spec.config_from_hf(spec.config_to_hf(cfg))
    except Exception as e:                 # noqa: BLE001 - any failure means "not representable"
        return [f"{type(e).__name__}: {e}"]
    a, b = canonical(cfg), canonical(back)
    errs = []
    for k in sorted(set(a) | set(b)):
        if not _same(a.get(k), b.get(k)):
            errs.append(f"model.{k}={a.get(k)!r} (as {spec.architecture} it would be {b.get(k)!r})")
    return errs
