"""The GPT-style families: GPT-2 (Conv1D weights stored (in, out), fused c_attn), GPT-NeoX (per-head
fused query_key_value, parallel residual), GPT-J (interleaved rope, parallel block, head bias), Phi and
Phi-3 (fused qkv_proj and gate_up_proj), with the tensor transforms their fused layouts need.
"""
from __future__ import annotations

import torch

from forge.config import ModelConfig
from forge.models.hf.common import (Transform, UnsupportedModelError, _act_from_hf, _act_to_hf, _base,
                                    _common_to_hf, _get, _rope_from_hf, _rope_to_hf, hf_config_object)


# ---------------------------------------------------------------- transforms
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
    v = t.reshape(cfg.n_heads, 3, cfg.head_dim, *t.shape[1:])
    return [v[:, j].reshape(cfg.n_heads * cfg.head_dim, *t.shape[1:]).contiguous() for j in range(3)]


def _neox_qkv_to_hf(ts, cfg):
    rest = ts[0].shape[1:]
    parts = [t.reshape(cfg.n_heads, cfg.head_dim, *rest) for t in ts]
    return [torch.stack(parts, dim=1).reshape(3 * cfg.n_heads * cfg.head_dim, *rest).contiguous()]


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
    scale_weights = cfg.attn_scale is None or cfg.attn_scale == cfg.head_dim ** -0.5
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_positions=cfg.max_seq_len, n_inner=cfg.d_ff, layer_norm_epsilon=cfg.norm_eps,
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
    d.update(intermediate_size=cfg.d_ff, hidden_act=_act_to_hf(cfg.activation, "gelu_new"),
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
                n_positions=cfg.max_seq_len, n_inner=cfg.d_ff, rotary_dim=cfg.rotary_dim,
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
    d.update(num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.d_ff,
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


# ---------------------------------------------------------------- Phi-3
def _phi3_qkv_to_forge(ts, cfg):             # qkv_proj rows = [q (H*hd) | k (Hkv*hd) | v (Hkv*hd)]
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
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
    d.update(num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.d_ff, rms_norm_eps=cfg.norm_eps,
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
