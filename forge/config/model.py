"""The `model` section: ModelConfig, every architectural difference between families as a field,
with its derived sizes and its `validate` (the model against itself)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from forge.config.core import ConfigError, check_choices, check_range
from forge.config.moe_quant import MoEConfig, QuantConfig


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
    def resolved(self) -> "ModelConfig":
        """A copy with every size that defaults to another one filled in; this config keeps its
        None (so dataclasses.replace on it derives again). Layers, the HF mappings and the memory
        plan read resolved configs only (forge.models.transformer.decoder_stages resolves), so
        each size has one name:
            n_kv_heads                None -> n_heads
            head_dim                  None -> d_model // n_heads
            qk_head_dim, v_head_dim   None -> head_dim
            d_ff                      None -> ff_multiple_of * ceil(ff_mult * d_model / ff_multiple_of)
            moe.d_ff                  None -> d_ff;  moe.shared_d_ff  None -> moe.d_ff"""
        head_dim = self.head_dim or self.d_model // self.n_heads
        d_ff = self.d_ff
        if not d_ff:
            m = self.ff_multiple_of
            d_ff = m * ((int(self.ff_mult * self.d_model) + m - 1) // m)
        expert_ff = self.moe.d_ff or d_ff
        return dataclasses.replace(
            self, n_kv_heads=self.n_kv_heads or self.n_heads, head_dim=head_dim, d_ff=d_ff,
            qk_head_dim=self.qk_head_dim or head_dim, v_head_dim=self.v_head_dim or head_dim,
            moe=dataclasses.replace(self.moe, d_ff=expert_ff, shared_d_ff=self.moe.shared_d_ff or expert_ff),
            quant=dataclasses.replace(self.quant))

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
    def rotary_dim(self) -> int:
        """Rotated channels per query/key head: qk_head_dim * rotary_pct (qk_head_dim resolved)."""
        return int(self.resolved().qk_head_dim * self.rotary_pct)

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
        sizes = self.resolved()
        if self.n_heads % sizes.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={sizes.n_kv_heads} does not divide model.n_heads={self.n_heads}")
        self._validate_positions(sizes)
        if "ssm" in set(self.attention_pattern or [self.attention]):
            self._validate_ssm()
        self._validate_attention_variants()
        self._validate_windows()
        self._validate_norms()
        self._validate_mlp()
        self._validate_embeddings()
        self._validate_mla(sizes)
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

    def _validate_positions(self, sizes: "ModelConfig") -> None:
        """Per-layer positions are in-attention kinds; the rotary width (of `sizes`, this config
        resolved) is even and positive."""
        if self.position_pattern is not None:
            from forge.models.layers.position import POSITION
            if not self.position_pattern:
                raise ConfigError("model.position_pattern must be a non-empty list or null")
            embed = sorted(k for k in set(self.position_pattern) if "embed" in POSITION[k])
            if embed:
                raise ConfigError(f"model.position_pattern entries {embed} add to the embeddings, not per layer; "
                                  f"use model.position for them (pattern entries: rope, alibi, none)")
        check_range("model.rope_theta_local", self.rope_theta_local, low=0, low_open=True, optional=True)
        r = sizes.rotary_dim
        if self.uses_rope and (r % 2 or r == 0):
            raise ConfigError(f"rotary dims = head_dim*model.rotary_pct = {sizes.qk_head_dim}*{self.rotary_pct} "
                              f"= {r} must be even and positive")

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

    def _validate_mla(self, sizes: "ModelConfig") -> None:
        """Multi-head latent attention (kind "mla"): positive ranks and widths, an even rotary width,
        one key/value head per query head, and none of the options its attention path does not take."""
        if "mla" not in set(self.attention_pattern or [self.attention]):
            return
        check_range("model.q_lora_rank", self.q_lora_rank, low=1, optional=True)
        for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
            check_range(f"model.{k}", getattr(self, k), low=1)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")
        if self.n_kv_heads not in (None, self.n_heads):
            raise ConfigError(f"model.attention='mla' expands its latent to one key/value per query head: "
                              f"model.n_kv_heads={self.n_kv_heads} must be null or model.n_heads={self.n_heads}")
        if self.qk_head_dim not in (None, self.qk_nope_head_dim + self.qk_rope_head_dim, sizes.head_dim):
            raise ConfigError(f"model.qk_head_dim={self.qk_head_dim} must be null with model.attention='mla' "
                              f"(an mla layer's query/key width is model.qk_nope_head_dim + model.qk_rope_head_dim)")
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
