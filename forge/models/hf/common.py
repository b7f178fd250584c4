"""What every Hugging Face family shares: the spec types (`FamilySpec`, `Transform`,
`UnsupportedModelError`; families.py's docstring says what a spec holds) and the helpers that map HF
config objects to Forge config fields and back (activations, rope parameters, per-layer attention kinds,
the fields most families share). The families themselves are in llama.py, gemma.py, olmo.py, gpt.py,
moe.py, deepseek.py, mamba2.py; the registry in families.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from forge.config import ModelConfig


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
