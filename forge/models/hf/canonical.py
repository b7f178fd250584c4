"""Representability: `canonical(cfg)`, the fields of a config that determine the function its model
computes, and `representation_errors(spec, cfg)`, why a family cannot hold a config exactly (a round
trip through the family's config mapping that changes a canonical field).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

from forge.config import ModelConfig
from forge.models.hf.common import FamilySpec
from forge.models.hf.moe import _moe_layer_indices
from forge.models.layers.position import POSITION


def canonical(cfg: ModelConfig) -> dict:
    """The fields of `cfg` that determine the function the model computes (and the max context),
    with equivalent spellings normalised (d_ff vs ff_mult, per-layer attention kinds, unused knobs)."""
    cfg = cfg.resolved()
    d = dataclasses.asdict(cfg)
    for k in ("preset", "dropout", "attn_dropout", "init_std", "ff_mult", "ff_multiple_of", "attention",
              "attention_pattern", "moe"):
        d.pop(k)
    d.update(n_experts=cfg.moe.n_experts,
             layer_kinds=tuple(cfg.layer_attention(i) for i in range(cfg.n_layers)),
             attn_scale=cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5)
    if cfg.moe.n_experts:
        d.update(_moe_canonical(cfg))
    kinds = set(d["layer_kinds"])
    _mla_canonical(cfg, d, kinds)
    if "sliding" not in kinds:
        d.pop("sliding_window")
    if "local" not in kinds:
        d.pop("local_window")
    _position_canonical(cfg, d)
    _norm_mlp_canonical(cfg, d)
    _ssm_canonical(cfg, d)
    return d


_ROPE = ("rope_theta", "rotary_pct", "rope_interleaved", "rope_scaling", "rope_scaling_factor",
         "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len",
         "rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_truncate", "rope_attention_factor")


def _position_canonical(cfg: ModelConfig, d: dict) -> None:
    """Positions per layer; rope keys only with rope, and only as far as the scaling kind reads them
    (none: theta, fraction, interleaving, kind; linear: + factor; llama3: + low/high frequency factors and
    original length; yarn: all but llama3's two factors), the rotary fraction as the rotated width;
    rope_theta_local only where a rope layer is local."""
    positions = tuple(cfg.layer_position(i) for i in range(cfg.n_layers))
    d.update(position=cfg.position if "embed" in POSITION[cfg.position] else None, layer_positions=positions)
    d.pop("position_pattern")
    local_rope = any(p == "rope" and k in ("sliding", "local") for p, k in zip(positions, d["layer_kinds"]))
    if not local_rope or cfg.rope_theta_local is None:
        d.pop("rope_theta_local")
        if local_rope:                        # None means: as the global layers
            d["rope_theta_local"] = None
    if not cfg.uses_rope:
        drop = _ROPE
    elif cfg.rope_scaling == "none":
        drop = _ROPE[4:]
    elif cfg.rope_scaling == "linear":
        drop = _ROPE[5:]
    elif cfg.rope_scaling == "llama3":
        drop = _ROPE[8:]
    else:                                     # yarn
        drop = _ROPE[5:7]
    for k in drop:
        d.pop(k)
    if cfg.position == "rope":
        d["rotary_pct"] = cfg.rotary_dim      # what the model uses


def _norm_mlp_canonical(cfg: ModelConfig, d: dict) -> None:
    """The norm at each place; norm knobs only where a norm of that kind is used; the MLP biases as
    up / down; initial values and training schedules dropped."""
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
        d.update(v_head_dim=cfg.v_head_dim, attn_scale=cfg.attn_scale if cfg.attn_scale is not None else qk ** -0.5)


def _moe_canonical(cfg: ModelConfig) -> dict:
    """The MoE settings that change the function (capacity factor, loss coefficients and the bias
    update rate are training-time settings: eval is dropless; a bias buffer itself does count)."""
    m = cfg.moe
    layers = tuple(_moe_layer_indices(cfg))
    expert_ff = m.d_ff
    shared = m.n_shared_experts * m.shared_d_ff
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
            back = spec.config_from_hf(spec.config_to_hf(cfg.resolved()))
    except Exception as e:                 # noqa: BLE001 - any failure means "not representable"
        return [f"{type(e).__name__}: {e}"]
    a, b = canonical(cfg), canonical(back)
    errs = []
    for k in sorted(set(a) | set(b)):
        if not _same(a.get(k), b.get(k)):
            errs.append(f"model.{k}={a.get(k)!r} (as {spec.architecture} it would be {b.get(k)!r})")
    return errs
