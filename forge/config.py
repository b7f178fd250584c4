"""Typed job configuration: dataclasses, YAML files and dotted overrides.

`load_config("configs/x.yaml", ["model.n_layers=4", "optim.lr=3e-4"])` returns a validated, resolved
`JobConfig`. Precedence, lowest first: dataclass defaults < `model.preset` < YAML < overrides.
Every key is checked against the dataclass fields (unknown key -> error naming it), every value
against the field's type, and every section against its ranges (each section's `validate`: numbers
finite and in range, NaN and inf refused) and the model against itself (`ModelConfig.validate`),
before any work.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_range(key: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False,
                what: str = "") -> None:
    """Raise ConfigError naming `key` unless `value` is a finite number in the interval given
    by low/high (open ends where low_open/high_open); None passes when `optional`. NaN and inf
    never pass (every numeric field of the config is a finite quantity)."""
    if value is None and optional:
        return
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    want = what or (f"in {lo}, {hi}" if low is not None and high is not None else
                    f"{'>' if low_open else '>='} {low:g}" if low is not None else
                    f"{'<' if high_open else '<='} {high:g}" if high is not None else "a number")
    null = " or null" if optional else ""
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number {want}{null}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{key}={value!r} must be {want}{null}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{key}={value!r} must be {want}{null}")


def check_choices(section: Any, prefix: str) -> None:
    """The one check of every enumerated field: a field annotated `Literal[...]` (or `Optional` of
    one) must hold one of the literal values; nested sections are checked under their own prefix.
    Registry-valued fields (attention, norm, ...) are checked against their registries instead."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}.{f.name}")
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            if value is None and type(None) in typing.get_args(tp):
                continue
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(f"{prefix}.{f.name}={value!r} is not one of {sorted(typing.get_args(tp), key=str)}")


@dataclass
class MoEConfig:
    """Mixture-of-experts MLP settings (n_experts=0 means dense)."""
    n_experts: int = 0              # routed experts per MoE layer; 0 = dense MLP everywhere
    top_k: int = 2                  # experts each token is routed to
    every: int = 1                  # MoE in every k-th layer
    first_dense: int = 0            # the first k layers stay dense
    router: Literal["softmax", "sigmoid"] = "softmax"   # expert weights: softmax over the logits, or a sigmoid per expert (DeepSeek-V3)
    renormalize: bool = True        # renormalise the chosen top-k weights to sum to 1
    d_ff: Optional[int] = None      # expert hidden size (default: model d_ff)
    n_shared_experts: int = 0       # experts every token also passes through (DeepSeek, Qwen2-MoE)
    shared_d_ff: Optional[int] = None  # hidden size of each shared expert (default: moe.d_ff)
    shared_gate: bool = False       # Qwen2-MoE style sigmoid gate on the shared expert
    capacity_factor: Optional[float] = None   # None = dropless
    aux_loss_coef: float = 0.0      # weight of the load-balancing auxiliary loss
    z_loss_coef: float = 0.0        # weight of the router z-loss (mean squared logsumexp of the router logits)
    bias_update_rate: float = 0.0   # aux-loss-free balancing (DeepSeek-V3); 0 = off
    router_bias: bool = False       # a learned bias on the router logits (gpt-oss)
    # group-limited routing and scaled routed output (DeepSeek-V3)
    n_group: int = 1                # experts split into this many equal groups (1 = no grouping) ...
    topk_group: int = 1             # ... and top-k picked among the experts of the best topk_group groups
                                    # (a group's score: the sum of its 2 best selection scores)
    routed_scaling_factor: float = 1.0   # the routed experts' weights multiplied by this (after renormalize)

    def validate(self, prefix: str = "model.moe") -> "MoEConfig":
        """Every count is >= 0 (sizes >= 1 where set), the coefficients finite and >= 0."""
        check_range(f"{prefix}.n_experts", self.n_experts, low=0)
        check_range(f"{prefix}.n_shared_experts", self.n_shared_experts, low=0)
        check_range(f"{prefix}.top_k", self.top_k, low=1)
        check_range(f"{prefix}.every", self.every, low=1)
        check_range(f"{prefix}.first_dense", self.first_dense, low=0)
        for k in ("d_ff", "shared_d_ff"):
            check_range(f"{prefix}.{k}", getattr(self, k), low=1, optional=True)
        check_range(f"{prefix}.capacity_factor", self.capacity_factor, low=0, low_open=True, optional=True)
        for k in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            check_range(f"{prefix}.{k}", getattr(self, k), low=0)
        check_range(f"{prefix}.n_group", self.n_group, low=1)
        check_range(f"{prefix}.topk_group", self.topk_group, low=1)
        check_range(f"{prefix}.routed_scaling_factor", self.routed_scaling_factor, low=0, low_open=True)
        if not self.n_experts:             # dense: the routing keys are unused
            return self
        if self.top_k > self.n_experts:
            raise ConfigError(f"{prefix}.top_k={self.top_k} must be in [1, {prefix}.n_experts={self.n_experts}]")
        if self.shared_gate and not self.n_shared_experts:
            raise ConfigError(f"{prefix}.shared_gate=true needs {prefix}.n_shared_experts > 0")
        check_range(f"{prefix}.topk_group", self.topk_group, high=self.n_group, what=f"<= {prefix}.n_group")
        if self.n_experts % self.n_group:
            raise ConfigError(f"{prefix}.n_group={self.n_group} must divide {prefix}.n_experts={self.n_experts}")
        if self.n_group > 1:
            if self.n_experts // self.n_group < 2:
                raise ConfigError(f"{prefix}.n_group={self.n_group} leaves fewer than 2 experts per group "
                                  f"({prefix}.n_experts={self.n_experts}); a group's score sums its best 2")
            if self.top_k > self.topk_group * (self.n_experts // self.n_group):
                raise ConfigError(f"{prefix}.top_k={self.top_k} exceeds the experts of {prefix}.topk_group="
                                  f"{self.topk_group} groups ({self.topk_group * (self.n_experts // self.n_group)})")
        return self


QUANT_POINTS = ("qkv_in", "o_in", "scores", "probs", "mlp_in", "mlp_hidden")


@dataclass
class QuantConfig:
    """Quantisation-aware training (forge.parallel.quant): fake quantisation with a clipped
    straight-through gradient, ramped in over warmup_steps (mix = min(1, step / warmup_steps)).
    A method of None leaves that kind of tensor in full precision; bits >= 16 too."""
    weight_method: Optional[str] = None     # attention and MLP projection weights: symmetric | affine | ternary
    weight_bits: int = 8                    # bit width b of the weights (>= 16: full precision)
    weight_granularity: Literal["tensor", "channel"] = "tensor"   # one weight scale per tensor, or per output row (channel)
    embed_method: Optional[str] = None      # token table wte and learned positions
    embed_bits: int = 8                     # bit width of the embedding tables
    embed_granularity: Literal["tensor", "channel"] = "tensor"    # one scale per table, or per row: token / position (channel)
    act_method: Optional[str] = None        # activations at act_points, one scale per token
    act_bits: int = 8                       # bit width of the activations at act_points
    act_points: list[str] = field(default_factory=list)   # subset of QUANT_POINTS: qkv_in (input of wq/wk/wv),
                                            # o_in (of wo), scores / probs (explicit attention scores only),
                                            # mlp_in (of the up/gate projections), mlp_hidden (of the down one)
    warmup_steps: int = 0                   # the quant_warmup_steps of the ramp; 0 = quantised from step 1
    linear: str = "linear"                  # LINEAR_KIND: linear (weight_* above) | bitlinear_1p58 (BitNet b1.58:
                                            # absmean ternary weights, per-token absmax int8 inputs, plain STE)

    @property
    def enabled(self) -> bool:
        return self.linear != "linear" or any(m is not None for m in (self.weight_method, self.embed_method,
                                                                     self.act_method))

    def validate(self, prefix: str = "model.quant") -> "QuantConfig":
        from forge.parallel.quant import LINEAR_KIND, QUANT_METHOD
        if self.linear not in LINEAR_KIND:
            raise ConfigError(f"{prefix}.linear={self.linear!r} is not one of {sorted(LINEAR_KIND)}")
        if self.linear != "linear" and self.weight_method is not None:
            raise ConfigError(f"{prefix}.linear={self.linear!r} fixes how weights are quantised; "
                              f"{prefix}.weight_method must be null")
        for kind in ("weight", "embed", "act"):
            m = getattr(self, f"{kind}_method")
            if m is not None and m not in QUANT_METHOD:
                raise ConfigError(f"{prefix}.{kind}_method={m!r} is not one of {sorted(QUANT_METHOD)} (or null)")
            check_range(f"{prefix}.{kind}_bits", getattr(self, f"{kind}_bits"), low=2)
        bad = [p for p in self.act_points if p not in QUANT_POINTS]
        if bad:
            raise ConfigError(f"{prefix}.act_points has {bad}, not among {list(QUANT_POINTS)}")
        if self.act_points and self.act_method is None:
            raise ConfigError(f"{prefix}.act_points={self.act_points} is set but {prefix}.act_method is null")
        check_range(f"{prefix}.warmup_steps", self.warmup_steps, low=0)
        return self


# model.output_softmax -> (base, temperature) of p_v = b^(z_v / t) / sum_u b^(z_u / t) over the vocabulary
OUTPUT_SOFTMAX = {"softmax": lambda m: (math.e, 1.0), "softermax": lambda m: (2.0, 1.0),
                  "strongermax": lambda m: (m.strongermax_base, m.strongermax_temperature)}


@dataclass
class ModelConfig:
    """Every architectural difference between families is a field here (never a model name)."""
    preset: Optional[str] = None            # a forge.models.presets name: the base that the other model keys override
    vocab_size: int = 256                   # embedding rows: the tokenizer's size unless set (>= it)
    d_model: int = 64                       # hidden size
    n_layers: int = 2                       # transformer blocks
    n_heads: int = 4                        # query heads
    n_kv_heads: Optional[int] = None        # None = n_heads (MHA); 1 = MQA; else GQA
    head_dim: Optional[int] = None          # None = d_model // n_heads
    max_seq_len: int = 256                  # longest sequence (positions, KV cache); data.seq_len <= this
    # attention
    attention: str = "causal"               # ATTENTION registry key, used for every layer ...
    attention_pattern: Optional[list[str]] = None   # ... unless this per-layer list (cycled) is set
    sliding_window: Optional[int] = None    # for "sliding": query i sees keys j with i - j < window
    local_window: Optional[int] = None      # for "local": causal attention inside blocks of this size
    qkv_bias: bool = False                  # bias on the q, k, v projections (GPT-2, Qwen2)
    attn_out_bias: bool = False             # bias on the attention output projection
    qk_norm: str = "none"                   # QK_NORM key: none | head (Qwen3) | full (OLMo2) | l2_scale (Henry 2020)
    attn_softcap: Optional[float] = None    # scores -> cap * tanh(scores / cap)  (Gemma 2)
    attn_scale: Optional[float] = None      # None = head_dim ** -0.5
    qkv_clip: Optional[float] = None        # clamp q, k, v projections to [-c, c] (OLMo clip_qkv)
    # attention score functions, qk-norm scale, head widths (forge.models.layers.scores, attention)
    attention_softmax: str = "softmax"      # SCORE key; softmax = SDPA; others explicit, in query chunks
    attention_chunk: int = 256              # queries per chunk of explicit scores: O(T * chunk) per head
    attention_divisor: Optional[float] = None   # relumax..squareplus, polymax: p = f(s) / d; None: d = visible keys
    consmax_per_head: bool = True           # consmax: one (beta, gamma) per head, else one pair per layer
    consmax_beta: float = 2.0               # consmax: initial beta (p = e^(s - beta) / gamma)
    consmax_gamma: float = 100.0            # consmax: initial gamma
    strongermax_base: float = math.e        # strongermax: p = base^(s/temperature) / sum
    strongermax_temperature: float = 1.0    # strongermax: the temperature t
    polymax_x_intercept: float = -100.0     # polymax: 0 below x0, linear to y0 at 0, s^power + y0 above
    polymax_y_intercept: float = 1.0        # polymax: y0, the value at s = 0
    polymax_power: float = 2.0              # polymax: the power of s above 0
    squareplus_b: float = 4 * math.log(2) ** 2   # squareplus: (s + sqrt(s^2 + b)) / 2
    qk_norm_scale: Optional[float] = None   # l2_scale: initial g; None = log2(L^2 - L), L = max_seq_len
    qk_head_dim: Optional[int] = None       # query/key width per head (None = head_dim)
    v_head_dim: Optional[int] = None        # value width per head (None = head_dim); wo reads n_heads * v_head_dim
    # multi-head latent attention (attention kind "mla", forge.models.layers.mla; DeepSeek-V2/V3): queries and
    # keys have qk_nope_head_dim + qk_rope_head_dim channels per head, values v_head_dim (None = head_dim)
    q_lora_rank: Optional[int] = None       # mla: queries through a rank-r bottleneck D -> r, RMS-normed, -> heads;
                                            # null = one D -> heads projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 32                  # mla: width of the compressed kv latent (cached, RMS-normed) that
                                            # every head's key (no-rope part) and value are expanded from
    qk_nope_head_dim: int = 16              # mla: per-head query/key channels without position (from the latent)
    qk_rope_head_dim: int = 8               # mla: rotary channels per head; the key's are one rotated key shared
                                            # by all heads (cached beside the latent)
    output_softmax: str = "softmax"         # next-token distribution: softmax | softermax (2^z) | strongermax
    # positions
    position: str = "rope"                  # POSITION registry key
    rope_theta: float = 10000.0             # RoPE base: inv_freq_i = theta ** (-2i / rotary dims)
    rotary_pct: float = 1.0                 # fraction of head_dim rotated (Phi, NeoX)
    rope_interleaved: bool = False          # GPT-J pairs (0,1),(2,3)...; False = NeoX halves
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"   # long-context rescaling of the RoPE frequencies
    rope_scaling_factor: float = 1.0        # linear / llama3 / yarn scaling: frequencies divided by this
    rope_low_freq_factor: float = 1.0       # llama3 scaling: wavelengths > original_max_seq_len / this are scaled fully
    rope_high_freq_factor: float = 4.0      # llama3 scaling: wavelengths < original_max_seq_len / this are kept
    rope_original_max_seq_len: int = 8192   # llama3 / yarn scaling: the context length before scaling
    position_pattern: Optional[list[str]] = None    # per-layer POSITION keys (cycled) for the in-attention
                                            # position: e.g. ["rope", "rope", "rope", "none"] = NoPE every 4th
                                            # layer (SmolLM3); None = model.position on every layer
    rope_theta_local: Optional[float] = None        # rope base of sliding/local layers, unscaled (Gemma 3
                                            # rope_local_base_freq); None = rope_theta and rope_scaling there
    # attention sinks, YaRN rope scaling, clamped GLU (gpt-oss)
    attention_sinks: bool = False           # a learned logit per head joins each softmax's denominator, no value
                                            # (explicit scores in query chunks, like attention_softmax)
    rope_yarn_beta_fast: float = 32.0       # yarn: rotations at which frequencies stop being extrapolated
    rope_yarn_beta_slow: float = 1.0        # yarn: rotations below which frequencies are fully interpolated
    rope_yarn_truncate: bool = True         # yarn: round the correction range outward to whole dims
    rope_attention_factor: Optional[float] = None   # yarn: cos/sin multiplied by this; None = 0.1 ln(factor) + 1
    glu_limit: Optional[float] = None       # glu: gate clamped to <= this, up to [-this, this]; None = no clamp
    glu_up_offset: float = 0.0              # glu: act(gate) * (up + this)  (gpt-oss: 1)
    # norms
    norm: str = "rmsnorm"                   # NORM registry key, for every location not set below
    norm_attn: Optional[str] = None         # attention-input norm (None = norm)
    norm_mlp: Optional[str] = None          # MLP-input norm (None = norm)
    norm_post: Optional[str] = None         # post-/peri-LN norms after attention and MLP (None = norm)
    norm_final: Optional[str] = None        # final norm before the head (None = norm)
    norm_eps: float = 1e-5                  # epsilon added to the variance in norms
    norm_bias: bool = True                  # LayerNorm bias
    norm_offset: float = 0.0                # RMSNorm scale = offset + weight (Gemma: 1.0)
    dyt_alpha_init: float = 0.5             # dyt: initial value of the learned scalar alpha
    prmsnorm_pct: float = 1.0               # prmsnorm: the RMS is taken over the first ceil(pct * D) features
    hsnorm_radius: Optional[float] = None   # hyperspherenorm: radius r (None = sqrt(D))
    hsnorm_radius_learned: bool = True      # hyperspherenorm: r a learned scalar (else fixed)
    # mlp
    mlp: str = "glu"                        # MLP registry key: mlp (act(x W1) W2) | glu (act(x Wg) * x Wu) W2
                                            # | dual_path | kan | identity (forge/models/layers/mlp.py)
    activation: str = "silu"                # ACTIVATION registry key
    d_ff: Optional[int] = None              # exact hidden size, else ff_mult * d_model rounded up
    ff_mult: float = 4.0                    # MLP hidden size = ff_mult * d_model when d_ff is unset
    ff_multiple_of: int = 1                 # that hidden size rounded up to a multiple of this
    mlp_bias: bool = False                  # bias on the MLP linears
    mlp_up_bias: Optional[bool] = None      # bias of the input projections (in, gate, up; None = mlp_bias)
    mlp_down_bias: Optional[bool] = None    # bias of the output projections (None = mlp_bias)
    kan_degree: int = 3                     # kan: Chebyshev polynomials T_0 .. T_degree per input feature
    moe: MoEConfig = field(default_factory=MoEConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)   # quantisation-aware training
    # block wiring
    block: str = "pre_ln"                   # BLOCK registry key
    parallel_shared_norm: bool = True       # parallel block: one norm for attn+mlp (GPT-J, PaLM, Phi) or two (NeoX)
    # embeddings and head
    tie_embeddings: bool = False            # the output head shares the embedding matrix
    embed_scale: float = 1.0                # Gemma: sqrt(d_model); Granite: embedding_multiplier
    embed_scale_learned: bool = False       # embed_scale a learned scalar parameter (initialised at embed_scale)
    n_embd_wte: Optional[int] = None        # factorised embedding: table (V, n_embd_wte), learned up-projection
                                            # to d_model; a tied head projects d_model -> n_embd_wte first
    tie_embed_proj: bool = False            # that down-projection is the up-projection's transpose
    embed_init: str = "gaussian"            # EMBED_INIT key (forge/models/init.py): gaussian | onehot |
                                            # hypercube | unique_hypercube | angle_hypersphere
    embed_init_mean: float = 0.0            # gaussian: mean (std: init_std)
    embed_init_scale: float = 1.0           # onehot / hypercube / unique_hypercube: c; angle_hypersphere: radius
    residual_multiplier: float = 1.0        # y = x + m * branch(x)  (Granite residual_multiplier)
    logit_divisor: float = 1.0              # logits = head(x) / logit_divisor  (Granite logits_scaling)
    final_norm: bool = True                 # a norm after the last block, before the head
    head_bias: bool = False                 # bias on the output head
    logit_softcap: Optional[float] = None   # logits -> cap * tanh(logits / cap) (Gemma 2); null = off
    dropout: float = 0.0                    # embedding and residual dropout
    attn_dropout: float = 0.0               # dropout on the attention probabilities
    init_std: float = 0.02                  # std of the normal weight initialisation
    # learned steering vector (ReaLLM-Forge lsv): a parameter v (D,), zero at init, added to the residual
    # stream after block steering_layer's output, x_L <- x_L + v (Forge name layers.{L}.steering)
    steering_layer: Optional[int] = None    # block index L (0-based) after which v is added; null = none
    steering_freeze_model: bool = False     # train only the steering vector: every other parameter frozen
    # selective state-space layers (attention kind "ssm": Mamba-2, forge/models/layers/ssm.py); inner width
    # I = ssm_expand * d_model split into I / ssm_head_dim heads
    ssm_state_size: int = 16                # N: state channels per head (Mamba2 state_size)
    ssm_n_groups: int = 1                   # G: groups of heads sharing B and C (divides the heads)
    ssm_head_dim: int = 16                  # P: channels per ssm head
    ssm_expand: int = 2                     # inner width I = ssm_expand * d_model
    ssm_conv_kernel: int = 4                # K: causal depthwise convolution width over x, B, C
    ssm_conv_bias: bool = True              # bias on that convolution
    ssm_proj_bias: bool = False             # bias on the input and output projections (Mamba2 use_bias)
    ssm_chunk_size: int = 64                # Q: tokens per chunk of the chunked scan (O(T Q) work; exact)
    ssm_dt_min: float = 0.001               # initial time steps dt spaced geometrically from this ...
    ssm_dt_max: float = 0.1                 # ... to this over the heads (dt_bias = softplus^-1(dt))
    ssm_dt_clamp_min: float = 0.0           # dt = softplus(.) clamped to >= this (Mamba2 time_step_limit[0])
    ssm_dt_clamp_max: Optional[float] = None   # ... and <= this; null = no upper limit (time_step_limit[1] = inf)
    steering_datasets: int = 0              # n > 0: one learned vector per dataset of the blend, V (n, D) at
                                            # layers.{L}.steering; a sample of data.paths[d] gets V[d] (the
                                            # trainer passes each sample's d; forge generate --steer-dataset);
                                            # n must equal len(data.paths); 0 = one vector for all samples
    # sub-norms inside the branches (BitNet b1.58's attn_sub_norm / ffn_sub_norm): each a norm over a width
    # that tp splits (heads, hidden features): its mean square all-reduced, its weight sharded with them
    attn_sub_norm: Optional[str] = None     # NORM key of a norm on the heads' output (n_heads * v_head_dim) before
                                            # wo; null = none
    mlp_sub_norm: Optional[str] = None      # NORM key of a norm on the MLP hidden (d_ff) before the down
                                            # projection (mlp, glu); null = none

    # ---- derived sizes ----
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        hidden = int(self.ff_mult * self.d_model)
        m = self.ff_multiple_of
        return m * ((hidden + m - 1) // m)

    @property
    def up_bias(self) -> bool:
        return self.mlp_bias if self.mlp_up_bias is None else self.mlp_up_bias

    @property
    def down_bias(self) -> bool:
        return self.mlp_bias if self.mlp_down_bias is None else self.mlp_down_bias

    def norm_at(self, location: str) -> str:
        """The NORM key of a location: attn | mlp | post | final (model.norm_<location>, else model.norm)."""
        return getattr(self, f"norm_{location}") or self.norm

    @property
    def output_logit_factor(self) -> float:
        """ln(b) / t of model.output_softmax: the head multiplies its logits by it, so that softmax
        of what it returns (the loss, sampling) is b^(z/t) / sum b^(z/t). 1 for softmax."""
        if self.output_softmax == "softmax":
            return 1.0
        base, temperature = OUTPUT_SOFTMAX[self.output_softmax](self)
        return math.log(base) / temperature

    @property
    def ssm_inner(self) -> int:
        """I, the inner width of an ssm layer."""
        return self.ssm_expand * self.d_model

    def _validate_ssm(self) -> None:
        """The ssm_* sizes (read only when a layer is of kind "ssm")."""
        for k in ("ssm_state_size", "ssm_n_groups", "ssm_head_dim", "ssm_expand", "ssm_conv_kernel", "ssm_chunk_size"):
            check_range(f"model.{k}", getattr(self, k), low=1)
        for k in ("ssm_dt_min", "ssm_dt_max"):
            check_range(f"model.{k}", getattr(self, k), low=0, low_open=True)
        if self.ssm_dt_min > self.ssm_dt_max:
            raise ConfigError(f"model.ssm_dt_min={self.ssm_dt_min} must be <= model.ssm_dt_max={self.ssm_dt_max}")
        check_range("model.ssm_dt_clamp_min", self.ssm_dt_clamp_min, low=0)
        if self.ssm_dt_clamp_max is not None and self.ssm_dt_clamp_max <= self.ssm_dt_clamp_min:
            raise ConfigError(f"model.ssm_dt_clamp_max={self.ssm_dt_clamp_max} must exceed model.ssm_dt_clamp_min="
                              f"{self.ssm_dt_clamp_min} (or be null)")
        if self.ssm_inner % self.ssm_head_dim:
            raise ConfigError(f"model.ssm_head_dim={self.ssm_head_dim} does not divide the ssm inner width "
                              f"model.ssm_expand * model.d_model = {self.ssm_inner}")
        if (self.ssm_inner // self.ssm_head_dim) % self.ssm_n_groups:
            raise ConfigError(f"model.ssm_n_groups={self.ssm_n_groups} does not divide the ssm heads "
                              f"{self.ssm_inner // self.ssm_head_dim} (model.ssm_expand * model.d_model / "
                              f"model.ssm_head_dim)")

    @property
    def qk_hd(self) -> int:
        return self.qk_head_dim or self.hd

    @property
    def v_hd(self) -> int:
        return self.v_head_dim or self.hd

    @property
    def rotary_dim(self) -> int:
        return int(self.qk_hd * self.rotary_pct)

    def _validate_attention_variants(self) -> None:
        """Score functions, qk_norm=l2_scale and head widths (the registries checked their keys)."""
        kinds = set(self.attention_pattern or [self.attention])
        if self.attention_softmax != "softmax" and "linear" in kinds:
            raise ConfigError(f"model.attention_softmax={self.attention_softmax!r} needs attention scores; "
                              "model.attention='linear' has none (use causal, sliding or local)")
        for key in ("attention_chunk", "qk_head_dim", "v_head_dim", "attention_divisor", "strongermax_base",
                    "strongermax_temperature", "polymax_power"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(f"model.{key}={v} must be positive")
        if self.attention_sinks and (self.attention_softmax != "softmax" or kinds - {"causal", "sliding", "local", "identity"}):
            raise ConfigError(f"model.attention_sinks joins a softmax over attention scores: it needs "
                              f"model.attention_softmax='softmax' (got {self.attention_softmax!r}) and causal, "
                              f"sliding or local attention (got {sorted(kinds)})")
        if self.strongermax_base == 1.0:
            raise ConfigError("model.strongermax_base=1 makes every weight equal; use a base > 0 other than 1")
        if self.output_softmax not in OUTPUT_SOFTMAX:
            raise ConfigError(f"model.output_softmax={self.output_softmax!r} is not one of {sorted(OUTPUT_SOFTMAX)} "
                              "(the normalised score functions: the loss and sampling need a distribution)")
        if self.polymax_x_intercept >= 0:
            raise ConfigError(f"model.polymax_x_intercept={self.polymax_x_intercept} must be negative")
        if self.consmax_gamma == 0:
            raise ConfigError("model.consmax_gamma must be non-zero (p = e^(s - beta) / gamma)")
        if self.squareplus_b < 0:
            raise ConfigError(f"model.squareplus_b={self.squareplus_b} must be >= 0")
        if self.qk_norm == "l2_scale":
            if self.attn_scale is not None:
                raise ConfigError("model.attn_scale is set but model.qk_norm='l2_scale' learns the score scale "
                                  "(set model.qk_norm_scale for its initial value)")
            if self.qk_norm_scale is None and self.max_seq_len < 2:
                raise ConfigError("model.qk_norm='l2_scale' with model.max_seq_len < 2 needs model.qk_norm_scale")
        elif self.qk_norm_scale is not None:
            raise ConfigError(f"model.qk_norm_scale is set but model.qk_norm={self.qk_norm!r} (needs 'l2_scale')")

    def layer_attention(self, i: int) -> str:
        """Attention kind of layer i: the pattern entry (cycled) or the global kind."""
        if self.attention_pattern:
            return self.attention_pattern[i % len(self.attention_pattern)]
        return self.attention

    def validate_ranges(self) -> None:
        """The numeric fields' ranges: sizes >= 1 (where set), rope_theta, norm_eps, init_std,
        ff_mult, embed_scale and the caps/scales > 0, rotary_pct in (0, 1], all finite."""
        for k in ("n_kv_heads", "head_dim", "d_ff"):
            check_range(f"model.{k}", getattr(self, k), low=1, optional=True)
        check_range("model.ff_multiple_of", self.ff_multiple_of, low=1)
        check_range("model.rope_original_max_seq_len", self.rope_original_max_seq_len, low=1)
        for k in ("rope_theta", "norm_eps", "init_std", "ff_mult", "embed_scale", "rope_scaling_factor",
                  "rope_low_freq_factor", "rope_high_freq_factor"):
            check_range(f"model.{k}", getattr(self, k), low=0, low_open=True)
        for k in ("attn_softcap", "attn_scale", "logit_softcap", "qkv_clip"):
            check_range(f"model.{k}", getattr(self, k), low=0, low_open=True, optional=True)
        check_range("model.rotary_pct", self.rotary_pct, low=0, high=1, low_open=True)
        check_range("model.norm_offset", self.norm_offset)
        for k in ("dropout", "attn_dropout"):
            check_range(f"model.{k}", getattr(self, k), low=0, high=1, high_open=True)
        self.moe.validate()
        if self.steering_layer is not None and not 0 <= self.steering_layer < self.n_layers:
            raise ConfigError(f"model.steering_layer={self.steering_layer} must be in [0, model.n_layers="
                              f"{self.n_layers}) or null")
        if self.steering_freeze_model and self.steering_layer is None:
            raise ConfigError("model.steering_freeze_model=true needs model.steering_layer (a steering vector to train)")
        check_range("model.steering_datasets", self.steering_datasets, low=0)
        if self.steering_datasets and self.steering_layer is None:
            raise ConfigError("model.steering_datasets > 0 needs model.steering_layer (where the vectors are added)")
        self.quant.validate()

    def layer_position(self, i: int) -> str:
        """In-attention position kind of layer i: the position_pattern entry (cycled) or model.position."""
        if self.position_pattern:
            return self.position_pattern[i % len(self.position_pattern)]
        return self.position

    @property
    def uses_rope(self) -> bool:
        return self.position == "rope" or "rope" in (self.position_pattern or [])

    def validate(self) -> "ModelConfig":
        """The model against itself, before anything is built: choices and registry keys, sizes
        and ranges, then each part's own rules (positions, attention kinds, norms, MLP/MoE,
        quantisation, embeddings). ConfigError naming the key otherwise."""
        check_choices(self, "model")
        self._validate_keys()
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check_range(f"model.{k}", getattr(self, k), low=1, what="positive")
        self.validate_ranges()
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_kv_heads={self.kv_heads} does not divide model.n_heads={self.n_heads}")
        self._validate_positions()
        if "ssm" in set(self.attention_pattern or [self.attention]):
            self._validate_ssm()
        self._validate_attention_variants()
        self._validate_windows()
        self._validate_norms()
        self._validate_mlp()
        self._validate_embeddings()
        self._validate_mla()
        self._validate_sub_norms()
        return self

    def _validate_keys(self) -> None:
        """Every registry-valued field holds a key of its registry; refused attention kinds say why."""
        from forge.models.layers.attention import REFUSED_ATTENTION
        from forge.models.registry import REGISTRIES
        for kind in self.attention_pattern or [self.attention]:
            if kind in REFUSED_ATTENTION:
                raise ConfigError(f"model.attention={kind!r} is not implemented: {REFUSED_ATTENTION[kind]}")
        for key, reg in REGISTRIES.items():
            values = getattr(self, key)
            for v in (values if isinstance(values, list) else [values]):
                if v is not None and v not in reg:
                    raise ConfigError(f"model.{key}={v!r} is not one of {sorted(reg)}")
        if self.attention_pattern is not None and not self.attention_pattern:
            raise ConfigError("model.attention_pattern must be a non-empty list or null")

    def _validate_positions(self) -> None:
        """Per-layer positions are in-attention kinds; the rotary width is even and positive."""
        if self.position_pattern is not None:
            from forge.models.layers.position import POSITION
            if not self.position_pattern:
                raise ConfigError("model.position_pattern must be a non-empty list or null")
            embed = sorted(k for k in set(self.position_pattern) if "embed" in POSITION[k])
            if embed:
                raise ConfigError(f"model.position_pattern entries {embed} add to the embeddings, not per layer; "
                                  f"use model.position for them (pattern entries: rope, alibi, none)")
        check_range("model.rope_theta_local", self.rope_theta_local, low=0, low_open=True, optional=True)
        if self.uses_rope and (self.rotary_dim % 2 or self.rotary_dim == 0):
            raise ConfigError(f"rotary dims = head_dim*model.rotary_pct = {self.hd}*{self.rotary_pct} "
                              f"= {self.rotary_dim} must be even and positive")

    def _validate_windows(self) -> None:
        """A sliding/local kind has its window, and a window lies in [1, max_seq_len]."""
        kinds = set(self.attention_pattern or [self.attention])
        for kind, key in (("sliding", "sliding_window"), ("local", "local_window")):
            w = getattr(self, key)
            if kind in kinds and not w:
                raise ConfigError(f"model.attention uses {kind!r} but model.{key} is not set")
            if w is not None and (w <= 0 or w > self.max_seq_len):
                raise ConfigError(f"model.{key}={w} must be in [1, model.max_seq_len={self.max_seq_len}]")

    def _validate_norms(self) -> None:
        """A per-location norm kind is set only where the block has that norm; norm parameters in range."""
        from forge.models.block import BLOCK
        owned = BLOCK[self.block][0]
        has = {"attn": "attn_norm" in owned,
               "mlp": "mlp_norm" in owned and not (self.block == "parallel" and self.parallel_shared_norm),
               "post": "post_attn_norm" in owned, "final": self.final_norm}
        for loc, present in has.items():
            if getattr(self, f"norm_{loc}") is not None and not present:
                raise ConfigError(f"model.norm_{loc}={getattr(self, f'norm_{loc}')!r} is set but model.block="
                                  f"{self.block!r} (parallel_shared_norm={self.parallel_shared_norm}, final_norm="
                                  f"{self.final_norm}) has no such norm")
        if not 0 < self.prmsnorm_pct <= 1:
            raise ConfigError(f"model.prmsnorm_pct={self.prmsnorm_pct} must be in (0, 1]")
        check_range("model.hsnorm_radius", self.hsnorm_radius, low=0, low_open=True, optional=True)

    def _validate_mlp(self) -> None:
        """KAN's degree; the mixture of experts takes a glu/mlp with parameter-free activations and no
        weight or MLP quantisation; attention-score quantisation needs a kind that has scores."""
        if self.kan_degree < 1:
            raise ConfigError(f"model.kan_degree={self.kan_degree} must be >= 1")
        q = self.quant
        if {"scores", "probs"} & set(q.act_points):
            scoreless = sorted({k for k in self.attention_pattern or [self.attention] if k in ("linear", "identity", "ssm")})
            if scoreless:
                raise ConfigError(f"model.quant.act_points={q.act_points} quantises attention scores, but "
                                  f"model.attention {scoreless} computes none (only the softmax kinds have scores)")
        if not self.moe.n_experts:
            return
        if q.weight_method or q.linear != "linear" or {"mlp_in", "mlp_hidden"} & set(q.act_points):
            raise ConfigError("model.quant (weights or MLP activations) does not reach the stacked experts of "
                              "model.moe.n_experts > 0; quantisation-aware training is for dense MLPs")
        if self.mlp not in ("mlp", "glu"):
            raise ConfigError(f"model.mlp={self.mlp!r} has no mixture-of-experts form (model.moe.n_experts > 0 "
                              f"needs model.mlp in ['glu', 'mlp'])")
        from forge.models.layers.mlp import activation_is_learned
        if activation_is_learned(self.activation):
            raise ConfigError(f"model.activation={self.activation!r} has learned parameters, which the "
                              f"stacked experts of model.moe.n_experts > 0 do not hold")

    def _validate_mla(self) -> None:
        """Multi-head latent attention (kind "mla"): positive ranks and widths, an even rotary width,
        one key/value head per query head, and none of the options its attention path does not take."""
        if "mla" not in set(self.attention_pattern or [self.attention]):
            return
        check_range("model.q_lora_rank", self.q_lora_rank, low=1, optional=True)
        for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
            check_range(f"model.{k}", getattr(self, k), low=1)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")
        if self.kv_heads != self.n_heads:
            raise ConfigError(f"model.attention='mla' expands its latent to one key/value per query head: "
                              f"model.n_kv_heads={self.n_kv_heads} must be null or model.n_heads={self.n_heads}")
        if self.qk_head_dim is not None and self.qk_head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ConfigError(f"model.qk_head_dim={self.qk_head_dim} must be null with model.attention='mla' (its "
                              f"query/key width is model.qk_nope_head_dim + model.qk_rope_head_dim)")
        bad = [f"{k}={getattr(self, k)!r}" for k, off in (("qk_norm", "none"), ("attention_softmax", "softmax"),
                                                           ("attention_sinks", False), ("rotary_pct", 1.0))
               if getattr(self, k) != off]
        if {"scores", "probs"} & set(self.quant.act_points):
            bad.append(f"quant.act_points={self.quant.act_points}")
        if bad:
            raise ConfigError(f"model.attention='mla' takes a plain softmax over its latent keys and rotates all "
                              f"qk_rope_head_dim channels; unsupported with it: model.{', model.'.join(bad)}")
        positions = {self.layer_position(i) for i in range(self.n_layers) if self.layer_attention(i) == "mla"}
        if positions - {"rope", "none"}:
            raise ConfigError(f"model.attention='mla' layers take position 'rope' or 'none' (its decoupled "
                              f"rotary key), got {sorted(positions - {'rope', 'none'})}")

    def _validate_sub_norms(self) -> None:
        if self.mlp_sub_norm is not None and (self.mlp not in ("mlp", "glu") or self.moe.n_experts):
            raise ConfigError(f"model.mlp_sub_norm={self.mlp_sub_norm!r} needs a dense model.mlp in ['glu', 'mlp'] "
                              f"(got model.mlp={self.mlp!r}, model.moe.n_experts={self.moe.n_experts})")

    @property
    def embed_dim(self) -> int:
        """Width of the token table: model.n_embd_wte when factorised, else d_model."""
        return self.n_embd_wte or self.d_model

    def _validate_embeddings(self) -> None:
        if self.n_embd_wte is not None and not 0 < self.n_embd_wte < self.d_model:
            raise ConfigError(f"model.n_embd_wte={self.n_embd_wte} must be in [1, model.d_model={self.d_model}) "
                              f"or null (no factorisation)")
        if self.tie_embed_proj and not (self.n_embd_wte and self.tie_embeddings):
            raise ConfigError("model.tie_embed_proj=true needs a factorised (model.n_embd_wte set) and tied "
                              "(model.tie_embeddings=true) embedding")
        E, V = self.embed_dim, self.vocab_size
        if self.embed_init == "onehot" and V > E:
            raise ConfigError(f"model.embed_init='onehot' needs model.vocab_size={V} <= the table width {E} "
                              f"(model.n_embd_wte or model.d_model): distinct basis vectors")
        if self.embed_init == "unique_hypercube" and (E - 1 < 63 and V > 2 ** (E - 1)):
            raise ConfigError(f"model.embed_init='unique_hypercube' needs model.vocab_size={V} <= 2^(width-1) = "
                              f"{2 ** (E - 1)} corners with no two equal or opposite (width {E})")
        if self.embed_init != "gaussian" and self.embed_init_scale <= 0:
            raise ConfigError(f"model.embed_init_scale={self.embed_init_scale} must be positive")
        if self.logit_divisor == 0:
            raise ConfigError("model.logit_divisor must be nonzero")


@dataclass
class ParallelConfig:
    tp: int = 1                             # tensor-parallel size: each layer's linears split over tp ranks
    pp: int = 1                             # pipeline-parallel stages
    ep: int = 1                             # data ranks that split one set of experts (divides dp)
    zero_stage: Literal[0, 1, 2, 3] = 0     # ZeRO stage: 1 splits optimizer state over dp, 2 also grads, 3 also weights
    sequence_parallel: bool = False         # with tp > 1: norms and dropout on sequence shards (Megatron-style)
    pp_partition: str = "parameters"        # parameters | uniform | type:<regex>
    offload_optimizer: bool = False         # ZeRO optimizer state kept in CPU memory
    ds_config: Optional[str] = None         # a template from ds_configs/ (DeepSpeed-only settings)

    def validate(self) -> "ParallelConfig":
        """tp, pp, ep >= 1; zero_stage one of 0-3; pp_partition parameters | uniform | type:REGEX."""
        check_choices(self, "parallel")
        for k in ("tp", "pp", "ep"):
            check_range(f"parallel.{k}", getattr(self, k), low=1)
        if self.pp_partition not in ("parameters", "uniform") and not self.pp_partition.startswith("type:"):
            raise ConfigError(f"parallel.pp_partition={self.pp_partition!r} is not one of ['parameters', "
                              "'type:REGEX', 'uniform']")
        return self


@dataclass
class DataConfig:
    dataset: str = "shakespeare"            # "shakespeare" (embedded) or "indexed" (.bin/.idx shards)
    paths: list[str] = field(default_factory=list)    # shard-set directories (or prefixes)
    blend: Optional[list[float]] = None     # one weight per path
    split: list[float] = field(default_factory=lambda: [0.98, 0.02, 0.0])   # train/valid/test by documents
    tokenizer: str = "char"                 # char | bpe | path to tokenizer.json / HF folder
    vocab_size: int = 4096                  # for a tokenizer trained here (bpe)
    seq_len: Optional[int] = None           # sample length; None = model.max_seq_len
    cache_dir: Optional[str] = None         # where sample indices are cached (default: beside the data)

    def validate(self) -> "DataConfig":
        """split: three finite weights >= 0 with a positive sum; blend: finite weights >= 0 with a
        positive sum; vocab_size >= 1; seq_len >= 2 (inputs and next-token targets) where set."""
        for name, weights in (("split", self.split), ("blend", self.blend)):
            if weights is None:
                continue
            for i, w in enumerate(weights):
                check_range(f"data.{name}[{i}]", w, low=0)
            if not weights or sum(weights) <= 0:
                raise ConfigError(f"data.{name}={weights} must hold weights >= 0 with a positive sum")
        if len(self.split) > 3:
            raise ConfigError(f"data.split={self.split} has more than three (train, valid, test) weights")
        check_range("data.vocab_size", self.vocab_size, low=1)
        check_range("data.seq_len", self.seq_len, low=2, optional=True)
        return self


@dataclass
class OptimConfig:
    lr: float = 3e-4                        # peak learning rate (after warmup)
    min_lr: float = 3e-5                    # floor of the cosine / wsd decay, reached at train.max_steps
    weight_decay: float = 0.1               # AdamW decoupled weight decay (not on norms, biases)
    beta1: float = 0.9                      # AdamW first-moment decay
    beta2: float = 0.95                     # AdamW second-moment decay
    eps: float = 1e-8                       # AdamW epsilon
    grad_clip: float = 1.0                  # clip the global gradient norm to this; 0 = off
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"   # lr after warmup: cosine decay, warmup-stable-decay, or constant
    warmup_steps: int = 100                 # linear warmup from 0 to lr over this many steps
    decay_frac: float = 0.2                 # wsd: fraction of max_steps spent decaying
    # optimizer (forge.train.optimizers.OPTIMIZERS): adamw | lion | sgd | adafactor | muon | soap
    name: str = "adamw"                     # OPTIMIZERS key: adamw | lion | sgd | adafactor | muon | soap
    decay_embeddings: bool = True           # weight decay on embedding tables (norms, biases: never)
    momentum: float = 0.9                   # sgd: momentum (0 = plain SGD, no state)
    nesterov: bool = False                  # sgd: Nesterov momentum
    muon_momentum: float = 0.95             # muon: momentum of the orthogonalised matrices
    muon_nesterov: bool = True              # muon: Nesterov momentum
    muon_ns_steps: int = 5                  # muon: Newton-Schulz iterations
    soap_precondition_frequency: int = 10   # soap: recompute the eigenbases of G G^T, G^T G every this many steps

    def validate(self) -> "OptimConfig":
        """lr finite > 0, min_lr in [0, lr], betas in [0, 1), eps > 0, weight_decay >= 0,
        grad_clip >= 0 (0 = off), warmup_steps >= 0, decay_frac in [0, 1], soap_precondition_frequency
        >= 1; NaN and inf refused."""
        check_choices(self, "optim")
        check_range("optim.lr", self.lr, low=0, low_open=True)
        check_range("optim.min_lr", self.min_lr, low=0)
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        for k in ("beta1", "beta2"):
            check_range(f"optim.{k}", getattr(self, k), low=0, high=1, high_open=True)
        check_range("optim.eps", self.eps, low=0, low_open=True)
        check_range("optim.weight_decay", self.weight_decay, low=0)
        check_range("optim.grad_clip", self.grad_clip, low=0, what=">= 0 (0 turns clipping off)")
        check_range("optim.warmup_steps", self.warmup_steps, low=0)
        check_range("optim.decay_frac", self.decay_frac, low=0, high=1)
        check_range("optim.soap_precondition_frequency", self.soap_precondition_frequency, low=1)
        return self


@dataclass
class TrainConfig:
    max_steps: int = 1000                   # optimizer steps of the run (the lr schedule spans them)
    micro_batch_size: int = 8               # sequences per data-parallel rank per forward/backward
    grad_accum: int = 1                     # micro batches per step (micro_batch_size * grad_accum * dp sequences)
    seed: int = 1234                        # seeds the weights (per tensor name), the data order and dropout
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # compute dtype (bf16/fp16 keep fp32 master weights)
    out_dir: str = "runs/default"           # config.yaml, metrics.jsonl, summary.json, loss.png, checkpoints/ go here
    resume: str = "none"                    # none | auto | path to a checkpoint
    init_from: Optional[str] = None         # a fresh run starts from these weights: Forge folder, checkpoint,
                                            # HF folder or hub id (the model config comes from it)
    save_interval: int = 500                # checkpoint every this many steps, and at the end; 0 = at the end only
    eval_interval: int = 250                # validation every this many steps, and at the end; 0 = never
    eval_steps: int = 20                    # validation batches per eval (capped at the validation split)
    log_interval: int = 10                  # a metrics.jsonl training line every this many steps
    activation_checkpointing: Literal["none", "full", "attention"] = "none"   # recompute in backward: nothing, whole blocks, or attention only
    compile: bool = False                   # torch.compile the model (inductor)
    linear_backend: Literal["aten", "onednn", "auto"] = "aten"   # fp32 CPU linears (forge.kernels); auto picks per machine
    # non-finite steps (forge.train.nonfinite) and checkpoint retention (forge.train.checkpoint)
    max_skipped_steps: int = 5              # abort (NonFiniteError) after this many skipped steps in a row; 0 = never
    spike_factor: float = 0.0               # also skip a step whose loss > factor x mean of the last 20 applied; 0 = off
    keep_last: int = 0                      # keep the newest k complete checkpoints (+ keep_every's); 0 = keep all
    keep_every: int = 0                     # ... and every checkpoint whose step is a multiple of this; 0 = off
    # hangs (forge.train.watchdog): a stalled or dead rank ends the job instead of hanging it
    collective_timeout_s: float = 600.0     # a collective (every process group) or the wait for rank 0's
                                            # data index that takes longer raises on the waiting rank
    step_timeout_s: float = 1800.0          # no step, eval or save finished for this long: dump every
                                            # thread's stack and exit 124 (0 = no watchdog)
    first_step_timeout_s: float = 3600.0    # the same for the first step (torch.compile, warm-up);
                                            # 0 = step_timeout_s
    stop_timeout_s: float = 20.0            # after SIGINT/SIGTERM, a rank that has not finished its step
                                            # within this long (waiting for a dead peer) dumps its stacks
                                            # and exits 128+signal, unsaved (0 = wait for the step)

    def validate(self) -> "TrainConfig":
        """max_steps, micro_batch_size, grad_accum, eval_steps >= 1; the intervals >= 0 (0 = never);
        the choices known; out_dir a directory or creatable as one (checked before anything is
        written: an existing file there, or above it, is an error)."""
        check_choices(self, "train")
        for k in ("max_steps", "micro_batch_size", "grad_accum", "eval_steps"):
            check_range(f"train.{k}", getattr(self, k), low=1)
        for k in ("save_interval", "eval_interval", "log_interval"):
            check_range(f"train.{k}", getattr(self, k), low=0, what=">= 0 (0 = never)")
        for k in ("max_skipped_steps", "keep_last", "keep_every"):
            check_range(f"train.{k}", getattr(self, k), low=0, what=">= 0 (0 turns it off)")
        check_range("train.spike_factor", self.spike_factor, low=0)
        if self.spike_factor != 0 and not self.spike_factor > 1:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be 0 (off) or > 1")
        check_range("train.collective_timeout_s", self.collective_timeout_s, low=0, low_open=True, what="> 0 (seconds)")
        for k in ("step_timeout_s", "first_step_timeout_s"):
            check_range(f"train.{k}", getattr(self, k), low=0, what=">= 0 (seconds; 0 = off / step_timeout_s)")
        check_range("train.stop_timeout_s", self.stop_timeout_s, low=0, what=">= 0 (seconds; 0 = wait for the step)")
        if not self.out_dir:
            raise ConfigError("train.out_dir is empty; name the run directory (e.g. train.out_dir=runs/x)")
        node = os.path.abspath(self.out_dir)
        while node and not os.path.exists(node):
            parent = os.path.dirname(node)
            if parent == node:
                break
            node = parent
        if os.path.exists(node) and not os.path.isdir(node):
            what = "is a file" if node == os.path.abspath(self.out_dir) else f"lies under the file {node!r}"
            raise ConfigError(f"train.out_dir={self.out_dir!r} {what}, not a directory; choose another "
                              "train.out_dir (nothing was written)")
        return self


@dataclass
class LogConfig:
    progress: bool = True                   # tqdm progress bar on a terminal; plain log lines with an ETA otherwise
    wandb: bool = False                     # log to Weights & Biases (offline without an API key; pip install wandb)
    wandb_project: str = "forge"            # the wandb project name
    tensorboard: bool = False               # TensorBoard events in OUT/tensorboard (pip install tensorboard)
    plot: bool = True                       # redraw OUT/loss.png at each eval when matplotlib is installed


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "JobConfig":
        """Each section's own checks (its `validate`), then the checks across sections."""
        self.model.validate()
        for section in (self.parallel, self.data, self.optim, self.train):
            section.validate()
        if self.model.steering_freeze_model and self.parallel.pp > 1:
            raise ConfigError("model.steering_freeze_model=true with parallel.pp > 1 is not supported: the stages "
                              "without the steering vector would have nothing to train")
        self._validate_steering_datasets()
        moe, ep = self.model.moe, self.parallel.ep
        if moe.n_experts and self.parallel.zero_stage == 3:
            raise ConfigError("parallel.zero_stage=3 with a mixture-of-experts model (model.moe.n_experts > 0) is not "
                              "supported (DeepSpeed's MoE does not work with ZeRO-3); use parallel.zero_stage 0, 1 or 2")
        if ep > 1 and not moe.n_experts:
            raise ConfigError(f"parallel.ep={ep} needs a mixture-of-experts model (model.moe.n_experts > 0)")
        if moe.n_experts and moe.n_experts % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide model.moe.n_experts={moe.n_experts}")
        if self.data.seq_len is None:
            check_range("data.seq_len (= model.max_seq_len)", self.model.max_seq_len, low=2)
        elif self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.data.blend is not None and len(self.data.blend) != len(self.data.paths):
            raise ConfigError(f"data.blend has {len(self.data.blend)} weights for {len(self.data.paths)} data.paths")
        self._validate_layout()
        from forge.train.optimizers import check_optim      # the optimizer registry and its limits
        check_optim(self)
        return self

    def _validate_layout(self) -> None:
        """The parallel layout against the model and the run: what DeepSpeed's engines run (pipeline
        with ZeRO 0/1 only, fp16 loss scaling needs ZeRO >= 1 there, offload needs ZeRO), and tp
        splitting the heads, the MLP and expert hidden sizes and (sequence parallel) the sequence."""
        m, p, t = self.model, self.parallel, self.train
        if p.pp > 1 and p.zero_stage > 1:
            raise ConfigError(f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage}: DeepSpeed's pipeline engine "
                              "supports ZeRO stages 0 and 1 only; use parallel.zero_stage=1 (or parallel.pp=1 for ZeRO 2/3)")
        if t.precision == "fp16" and p.zero_stage == 0 and p.pp > 1:
            raise ConfigError("train.precision=fp16 with parallel.zero_stage=0 and parallel.pp > 1: DeepSpeed's pipeline "
                              "engine does not scale the fp16 loss at ZeRO 0; use parallel.zero_stage=1 (or bf16)")
        if p.sequence_parallel and p.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if p.offload_optimizer and p.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer=true needs parallel.zero_stage 1 or 2")
        if p.pp > m.n_layers + 3:
            raise ConfigError(f"parallel.pp={p.pp} exceeds the pipeline's {m.n_layers + 3} layers "
                              "(embedding, model.n_layers blocks, norm, head)")
        if p.tp == 1:
            return
        for key in ("attn_sub_norm", "mlp_sub_norm"):
            if getattr(m, key) not in (None, "rmsnorm", "identity"):
                raise ConfigError(f"model.{key}={getattr(m, key)!r} with parallel.tp={p.tp}: a sub-norm spans features "
                                  "split over tp; only 'rmsnorm' (mean square all-reduced) or 'identity' can")
        kinds = set(m.attention_pattern or [m.attention]) - {"identity"}
        if kinds and (m.n_heads % p.tp or (m.kv_heads % p.tp and p.tp % m.kv_heads)):
            raise ConfigError(f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads}, and divide or be a "
                              f"multiple of model.n_kv_heads={m.kv_heads}")
        from forge.models.layers.moe import is_moe_layer
        dense = m.mlp != "identity" and not all(is_moe_layer(m, i) for i in range(m.n_layers))
        if dense and m.ff_dim % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide the MLP hidden size {m.ff_dim} (model.d_ff, or "
                              "model.ff_mult * model.d_model rounded up to model.ff_multiple_of)")
        expert_ff = m.moe.d_ff or m.ff_dim
        if m.moe.n_experts and expert_ff % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide the expert hidden size {expert_ff} (model.moe.d_ff)")
        seq_len = self.data.seq_len or m.max_seq_len
        if p.sequence_parallel and seq_len % p.tp:
            raise ConfigError(f"parallel.sequence_parallel=true: parallel.tp={p.tp} does not divide "
                              f"data.seq_len={seq_len} (each rank holds seq_len / tp positions)")

    def check_world(self, world: int) -> None:
        """The layout against the number of processes: tp * pp divides it, ep divides the data-
        parallel size dp = world / (tp * pp)."""
        p = self.parallel
        if world % (p.tp * p.pp):
            raise ConfigError(f"the world size {world} is not divisible by parallel.tp * parallel.pp = {p.tp} * {p.pp}")
        dp = world // (p.tp * p.pp)
        if dp % p.ep:
            raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel size {dp} (= world {world} / "
                              f"(parallel.tp * parallel.pp))")

    def _validate_steering_datasets(self) -> None:
        n = self.model.steering_datasets
        if not n:
            return
        if self.parallel.pp > 1:
            raise ConfigError(f"model.steering_datasets={n} with parallel.pp={self.parallel.pp} is not supported: "
                              "the samples' dataset indices do not travel through the pipeline stages")
        datasets = len(self.data.paths) if self.data.dataset == "indexed" else 1
        if n != datasets:
            raise ConfigError(f"model.steering_datasets={n} must equal the number of datasets the samples come "
                              f"from: {datasets} (data.dataset={self.data.dataset!r}, data.paths={self.data.paths})")

    def resolved(self) -> "JobConfig":
        """A validated copy with the defaults that depend on another section filled in
        (data.seq_len None -> model.max_seq_len); this config is left as it is."""
        out = copy.deepcopy(self.validate())
        if out.data.seq_len is None:
            out.data.seq_len = out.model.max_seq_len
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable digest of the resolved config (compared across ranks)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- typed construction
def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to annotation `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not one of {sorted(options, key=str)}")
        return options[options.index(value)]          # 1.0 -> the literal 1
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)       # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build_dataclass(cls, values: dict, prefix: str = "", base=None):
    """Build `cls` from a dict, on top of `base` (an instance) or the defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    obj = dataclasses.replace(base) if base is not None else cls()
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys under {prefix or 'the top level'}: {sorted(names)}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            v = build_dataclass(hints[k], v, key, base=getattr(obj, k))
        setattr(obj, k, _check_type(v, hints[k], key))
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        k, v = item.split("=", 1)
        _set_dotted(tree, k.strip(), yaml.safe_load(v) if v.strip() else None)
    return tree


def merge_dicts(base: dict, top: dict) -> dict:
    """`base` with `top` laid over it, nested dicts merged key by key (top wins)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def add_config_arguments(parser) -> None:
    """The `[CONFIG] [key=value ...]` arguments of the commands that take a job config."""
    parser.add_argument("config", nargs="?", help="YAML config file (sections model/parallel/data/optim/train/log)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, values parsed as YAML")


def config_arguments(args) -> tuple[Optional[str], list[str]]:
    """(YAML path or None, overrides) from parsed `add_config_arguments` arguments: a first
    argument that holds `=` and is no file is an override."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not os.path.exists(path):
        path, overrides = None, [path] + overrides
    return path, overrides


def flatten_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in tree.items():
        out.update(flatten_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def model_from_dict(d: dict, prefix: str = "model") -> ModelConfig:
    """ModelConfig from a dict; `preset` (if any) is the base that the other fields override."""
    base = None
    if d.get("preset"):
        from forge.models.presets import PRESETS
        name = d["preset"]
        if name not in PRESETS:
            raise ConfigError(f"{prefix}.preset={name!r} is not one of {sorted(PRESETS)}")
        base = dataclasses.replace(PRESETS[name], moe=dataclasses.replace(PRESETS[name].moe),
                                   quant=dataclasses.replace(PRESETS[name].quant))
    return build_dataclass(ModelConfig, d, prefix, base=base)


def config_from_dict(d: dict) -> JobConfig:
    if not isinstance(d or {}, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {d!r}")
    d = dict(d or {})
    model = d.pop("model", {}) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping (a section of model.* keys), got {model!r}")
    model = model_from_dict(model)
    cfg = build_dataclass(JobConfig, d)
    cfg.model = model
    return cfg.resolved()


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> JobConfig:
    tree: dict = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} does not parse: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    tree = merge_dicts(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)


def unused_keys(cfg: JobConfig) -> dict[str, str]:
    """{dotted key: why}: the keys whose value the chosen options never read (e.g. data.vocab_size
    unless a BPE tokenizer is trained here), so a printed or saved config can say so."""
    m, out = cfg.model, {}

    def mark(keys, why):
        out.update({k: why for k in keys})
    if not m.moe.n_experts:
        mark([f"model.moe.{f.name}" for f in dataclasses.fields(MoEConfig) if f.name != "n_experts"],
             "model.moe.n_experts=0 (dense MLP)")
    rope_extra = ["rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len",
                  "rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_truncate", "rope_attention_factor"]
    if m.position != "rope":
        mark([f"model.{k}" for k in ["rope_theta", "rotary_pct", "rope_interleaved", "rope_scaling"] + rope_extra],
             f"model.position={m.position}")
    else:
        used = {"none": set(), "linear": {"rope_scaling_factor"},
                "llama3": set(rope_extra[:4]),
                "yarn": {"rope_scaling_factor", "rope_original_max_seq_len"} | set(rope_extra[4:])}[m.rope_scaling]
        mark([f"model.{k}" for k in rope_extra if k not in used], f"model.rope_scaling={m.rope_scaling}")
    kinds = set(m.attention_pattern or [m.attention])
    for kind, key in (("sliding", "sliding_window"), ("local", "local_window")):
        if kind not in kinds and getattr(m, key) is not None:
            mark([f"model.{key}"], f"no {kind!r} attention")
    if "ssm" not in kinds:
        mark([f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.name.startswith("ssm_")],
             "no 'ssm' layer")
    if "mla" not in kinds:
        mark([f"model.{k}" for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")],
             "no 'mla' attention")
    if m.norm != "layernorm":
        mark(["model.norm_bias"], f"model.norm={m.norm}")
    if m.block != "parallel":
        mark(["model.parallel_shared_norm"], f"model.block={m.block}")
    if m.d_ff:
        mark(["model.ff_mult", "model.ff_multiple_of"], f"model.d_ff={m.d_ff} is set")
    d = cfg.data
    if d.dataset == "shakespeare":
        mark(["data.paths", "data.blend", "data.split"], "data.dataset=shakespeare (the plays' own train/val split)")
        if d.tokenizer != "bpe":
            mark(["data.vocab_size"], f"data.tokenizer={d.tokenizer} (only a bpe tokenizer trained here reads it)")
    else:
        mark(["data.vocab_size"], f"data.dataset={d.dataset} (the tokenizer comes with the data)")
    if cfg.optim.schedule != "wsd":
        mark(["optim.decay_frac"], f"optim.schedule={cfg.optim.schedule}")
    if cfg.optim.schedule == "constant":
        mark(["optim.min_lr"], "optim.schedule=constant")
    if cfg.parallel.tp == 1:
        mark(["parallel.sequence_parallel"], "parallel.tp=1")
    if cfg.parallel.pp == 1:
        mark(["parallel.pp_partition"], "parallel.pp=1")
    if not cfg.log.wandb:
        mark(["log.wandb_project"], "log.wandb=false")
    return out


def config_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML, each key in `unused_keys` followed by `# unused: why`. Comments
    only: `yaml.safe_load` of the text is `cfg.to_dict()` (resume and the config hash read it so)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    unused, lines, path = unused_keys(cfg), [], []       # path: [(indent, key)] of the enclosing mappings
    for line in text.splitlines():
        key = re.match(r"^( *)([A-Za-z_]\w*):(?: |$)", line)
        if key:
            indent = len(key.group(1))
            path = [(i, k) for i, k in path if i < indent] + [(indent, key.group(2))]
            why = unused.get(".".join(k for _, k in path))
            if why:
                line += f"  # unused: {why}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def save_config(cfg: JobConfig, path: str) -> None:
    with open(path, "w") as f:
        f.write(config_yaml(cfg))
