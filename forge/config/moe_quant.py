"""The model's nested sections: `model.moe` (MoEConfig) and `model.quant` (QuantConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from forge.config.core import ConfigError, check_range


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
