"""Family presets: a plain dict name -> ModelConfig. No behaviour is chosen by name: each preset
is only a set of field values. `tiny-<family>` keeps a family's wiring at test size."""
from __future__ import annotations

import dataclasses
import math

from forge.config import ModelConfig, MoEConfig, QuantConfig

_GPT2 = dict(vocab_size=50257, max_seq_len=1024, position="learned", norm="layernorm", mlp="mlp",
             activation="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True)
_LLAMA = dict(position="rope", norm="rmsnorm", mlp="glu", activation="silu")
_PYTHIA = dict(vocab_size=50304, max_seq_len=2048, rotary_pct=0.25, norm="layernorm", mlp="mlp",
               activation="gelu", qkv_bias=True, attn_out_bias=True, mlp_bias=True, block="parallel",
               parallel_shared_norm=False)
_GEMMA = dict(vocab_size=256000, max_seq_len=8192, norm_offset=1.0, norm_eps=1e-6, mlp="glu",
              activation="gelu_tanh", tie_embeddings=True)
_GRANITE = dict(**_LLAMA, vocab_size=49155, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
                tie_embeddings=True, embed_scale=12.0, residual_multiplier=0.22)


def _p(**kw) -> ModelConfig:
    return ModelConfig(**kw)


def _with(base: dict, **kw) -> dict:
    return {**base, **kw}


PRESETS: dict[str, ModelConfig] = {
    "gpt2-124m": _p(**_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-355m": _p(**_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-774m": _p(**_GPT2, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-1.5b": _p(**_GPT2, d_model=1600, n_layers=48, n_heads=25),
    "llama1-7b": _p(**_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                    max_seq_len=2048, norm_eps=1e-6),
    "llama2-7b": _p(**_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                    max_seq_len=4096, norm_eps=1e-5),
    "llama3-8b": _p(**_LLAMA, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    d_ff=14336, max_seq_len=8192, rope_theta=500000.0),
    "llama3-70b": _p(**_LLAMA, vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                     d_ff=28672, max_seq_len=8192, rope_theta=500000.0),
    "llama3.2-1b": _p(**_LLAMA, vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      d_ff=8192, max_seq_len=131072, rope_theta=500000.0, rope_scaling="llama3",
                      rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_seq_len=8192, tie_embeddings=True),
    "mistral-7b": _p(**_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     d_ff=14336, max_seq_len=32768, attention="sliding", sliding_window=4096),
    "qwen2-0.5b": _p(**_LLAMA, vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                     d_ff=4864, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                     tie_embeddings=True),
    "qwen3-0.6b": _p(**_LLAMA, vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                     head_dim=128, d_ff=3072, max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6,
                     qk_norm="head", tie_embeddings=True),
    "gemma-2b": _p(**_GEMMA, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256,
                   d_ff=16384, embed_scale=math.sqrt(2048)),
    "gemma2-2b": _p(**_GEMMA, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256,
                    d_ff=9216, embed_scale=math.sqrt(2304), block="peri_ln",
                    attention_pattern=["sliding", "causal"], sliding_window=4096, attn_softcap=50.0,
                    logit_softcap=30.0, attn_scale=256 ** -0.5),
    "phi-2": _p(vocab_size=51200, d_model=2560, n_layers=32, n_heads=32, d_ff=10240, max_seq_len=2048,
                rotary_pct=0.4, norm="layernorm", mlp="mlp", activation="gelu_tanh", qkv_bias=True,
                attn_out_bias=True, mlp_bias=True, head_bias=True, block="parallel"),
    "pythia-160m": _p(**_PYTHIA, d_model=768, n_layers=12, n_heads=12),
    "pythia-410m": _p(**_PYTHIA, d_model=1024, n_layers=24, n_heads=16),
    "pythia-1b": _p(**_PYTHIA, d_model=2048, n_layers=16, n_heads=8),
    "gpt-j-6b": _p(vocab_size=50400, d_model=4096, n_layers=28, n_heads=16, d_ff=16384, max_seq_len=2048,
                   rotary_pct=0.25, rope_interleaved=True, norm="layernorm", mlp="mlp",
                   activation="gelu_tanh", mlp_bias=True, head_bias=True, block="parallel"),
    "olmo-1b": _p(**_with(_LLAMA, norm="nonparam_layernorm"), vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, d_ff=8192,
                  max_seq_len=2048, tie_embeddings=True),
    "olmo2-1b": _p(**_LLAMA, vocab_size=100352, d_model=2048, n_layers=16, n_heads=16, d_ff=8192,
                   max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-6, qk_norm="full",
                   block="norm_after"),
    "palm-style": _p(vocab_size=256000, d_model=4096, n_layers=32, n_heads=16, n_kv_heads=1, head_dim=256,
                     d_ff=16384, max_seq_len=2048, norm="layernorm", norm_bias=False, mlp="glu",
                     activation="silu", block="parallel", tie_embeddings=True),
    # Granite 3.0 (base): Llama wiring with embedding, residual, attention and logit multipliers
    "granite-3.0-2b": _p(**_GRANITE, d_model=2048, n_layers=40, n_heads=32, n_kv_heads=8, d_ff=8192,
                         attn_scale=1 / 64, logit_divisor=8.0),
    "granite-3.0-8b": _p(**_GRANITE, d_model=4096, n_layers=40, n_heads=32, n_kv_heads=8, d_ff=12800,
                         attn_scale=1 / 128, logit_divisor=16.0),
    # BitNet b1.58 2B4T: Llama wiring, relu2 GLU, sub-norms, ternary weights and int8 inputs in every projection
    "bitnet-b1.58-2b": _p(**_with(_LLAMA, activation="relu2"), vocab_size=128256, d_model=2560, n_layers=30,
                          n_heads=20, n_kv_heads=5, d_ff=6912, max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5,
                          tie_embeddings=True, attn_sub_norm="rmsnorm", mlp_sub_norm="rmsnorm",
                          quant=QuantConfig(linear="bitlinear_1p58")),
}

# test-size versions: the family's wiring, tiny widths
_TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, d_ff=128)
_TINY_OF = {
    "gpt2": ("gpt2-124m", {}),
    "llama": ("llama3-8b", dict(n_kv_heads=2)),
    "llama1": ("llama1-7b", {}),
    "llama2": ("llama2-7b", {}),
    "llama3": ("llama3.2-1b", dict(n_kv_heads=2, rope_original_max_seq_len=32, rope_scaling_factor=4.0)),
    "mistral": ("mistral-7b", dict(n_kv_heads=2, sliding_window=16)),
    "qwen2": ("qwen2-0.5b", dict(n_kv_heads=2)),
    "qwen3": ("qwen3-0.6b", dict(n_kv_heads=2, head_dim=32)),
    "gemma": ("gemma-2b", dict(n_kv_heads=1, head_dim=32, embed_scale=8.0)),
    "gemma2": ("gemma2-2b", dict(n_kv_heads=2, head_dim=32, embed_scale=8.0, sliding_window=16,
                                 attn_scale=32 ** -0.5)),
    "phi": ("phi-2", {}),
    "pythia": ("pythia-160m", {}),
    "neox": ("pythia-160m", {}),
    "gpt-j": ("gpt-j-6b", {}),
    "olmo": ("olmo-1b", {}),
    "olmo2": ("olmo2-1b", {}),
    "palm": ("palm-style", dict(n_kv_heads=1, head_dim=16)),
    "granite": ("granite-3.0-2b", dict(n_kv_heads=2, attn_scale=1 / 16)),
    "bitnet": ("bitnet-b1.58-2b", dict(n_kv_heads=2)),
}
for _family, (_base, _kw) in _TINY_OF.items():
    _fields = {**_TINY, **_kw}
    if PRESETS[_base].head_dim is not None and "head_dim" not in _kw:
        _fields["head_dim"] = None
    PRESETS[f"tiny-{_family}"] = dataclasses.replace(PRESETS[_base], **_fields)

# mixture of experts (MoE in every layer; d_ff is the expert hidden size where no layer is dense)
PRESETS.update({
    "mixtral-8x7b": _p(**_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       d_ff=14336, max_seq_len=32768, rope_theta=1000000.0,
                       moe=MoEConfig(n_experts=8, top_k=2, renormalize=True, aux_loss_coef=0.02)),
    "qwen3-moe-30b-a3b": _p(**_LLAMA, vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                            head_dim=128, d_ff=6144, max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6,
                            qk_norm="head",
                            moe=MoEConfig(n_experts=128, top_k=8, renormalize=True, d_ff=768, aux_loss_coef=0.001)),
    "olmoe-1b-7b": _p(**_LLAMA, vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, d_ff=1024,
                      max_seq_len=4096, qk_norm="full",
                      moe=MoEConfig(n_experts=64, top_k=8, renormalize=False, aux_loss_coef=0.01, z_loss_coef=0.001)),
})
_TINY_MOE = dict(n_experts=4, top_k=2)
for _family, _base, _kw, _moe in (
        ("mixtral", "mixtral-8x7b", dict(n_kv_heads=2), dict(renormalize=True, aux_loss_coef=0.02)),
        ("qwen3-moe", "qwen3-moe-30b-a3b", dict(n_kv_heads=2, head_dim=32),
         dict(renormalize=True, d_ff=64, aux_loss_coef=0.001)),
        ("olmoe", "olmoe-1b-7b", {}, dict(renormalize=False, aux_loss_coef=0.01, z_loss_coef=0.001))):
    PRESETS[f"tiny-{_family}"] = dataclasses.replace(PRESETS[_base], **{**_TINY, **_kw},
                                                     moe=MoEConfig(**_TINY_MOE, **_moe))

# per-layer positions (SmolLM3: NoPE on every 4th layer)
PRESETS["smollm3-3b"] = _p(**_LLAMA, vocab_size=128256, d_model=2048, n_layers=36, n_heads=16, n_kv_heads=4,
                           d_ff=11008, max_seq_len=65536, rope_theta=5000000.0, norm_eps=1e-6, tie_embeddings=True,
                           position_pattern=["rope", "rope", "rope", "none"])
PRESETS["tiny-smollm3"] = dataclasses.replace(PRESETS["smollm3-3b"], **{**_TINY, "n_layers": 4, "n_kv_heads": 2})

# Gemma 3: 5 local : 1 global layers, local rope base 10k (unscaled), global 1M (linear x8 from 4B up), qk-norm
_GEMMA3 = _with(_GEMMA, vocab_size=262144, max_seq_len=32768, head_dim=256, block="peri_ln", qk_norm="head",
                attention_pattern=["sliding"] * 5 + ["causal"], attn_scale=256 ** -0.5, rope_theta=1000000.0,
                rope_theta_local=10000.0)
PRESETS["gemma3-1b"] = _p(**_GEMMA3, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, d_ff=6912,
                          sliding_window=512, embed_scale=math.sqrt(1152))
PRESETS["gemma3-4b"] = _p(**_with(_GEMMA3, vocab_size=262208, max_seq_len=131072), d_model=2560, n_layers=34,
                          n_heads=8, n_kv_heads=4, d_ff=10240, sliding_window=1024, embed_scale=math.sqrt(2560),
                          rope_scaling="linear", rope_scaling_factor=8.0)      # text model only
PRESETS["tiny-gemma3"] = dataclasses.replace(PRESETS["gemma3-1b"], **{
    **_TINY, "n_layers": 6, "n_kv_heads": 2, "head_dim": 32, "embed_scale": 8.0, "sliding_window": 16,
    "attn_scale": 32 ** -0.5, "rope_scaling": "linear", "rope_scaling_factor": 8.0})

# Phi-3-mini-4k (HF stores fused qkv_proj / gate_up_proj; its window 2047 covers every layer)
PRESETS["phi3-mini"] = _p(**_LLAMA, vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, d_ff=8192,
                          max_seq_len=4096, attention="sliding", sliding_window=2047)
PRESETS["tiny-phi3"] = dataclasses.replace(PRESETS["phi3-mini"], **{**_TINY, "n_kv_heads": 2, "sliding_window": 16})

# gpt-oss: sinks, alternating 128-token sliding / full layers, YaRN x32 from 4096, attention and expert
# biases, a router bias, clamped quick_gelu GLU experts (limit 7, up + 1), untied head
_GPT_OSS = dict(_LLAMA, vocab_size=201088, d_model=2880, n_heads=64, n_kv_heads=8, head_dim=64, d_ff=2880,
                max_seq_len=131072, attention_pattern=["sliding", "causal"], sliding_window=128, qkv_bias=True,
                attn_out_bias=True, mlp_bias=True, attention_sinks=True, activation="quick_gelu", glu_limit=7.0,
                glu_up_offset=1.0, rope_theta=150000.0, rope_scaling="yarn", rope_scaling_factor=32.0,
                rope_original_max_seq_len=4096, rope_yarn_truncate=False, norm_eps=1e-5)
_GPT_OSS_MOE = dict(top_k=4, renormalize=True, router_bias=True, aux_loss_coef=0.001)
PRESETS["gpt-oss-20b"] = _p(**_GPT_OSS, n_layers=24, moe=MoEConfig(n_experts=32, **_GPT_OSS_MOE))
PRESETS["gpt-oss-120b"] = _p(**_GPT_OSS, n_layers=36, moe=MoEConfig(n_experts=128, **_GPT_OSS_MOE))
PRESETS["tiny-gpt-oss"] = dataclasses.replace(PRESETS["gpt-oss-20b"], **{
    **_TINY, "n_kv_heads": 2, "head_dim": 16, "sliding_window": 16, "rope_original_max_seq_len": 32,
    "rope_scaling_factor": 4.0}, moe=MoEConfig(**{**_GPT_OSS_MOE, **_TINY_MOE}))

# Mamba-2 (state-spaces/mamba2-130m as transformers' Mamba2ForCausalLM holds it): every layer a Mamba-2
# mixer after one RMSNorm, no MLP, no positions, tied head; vocabulary padded to a multiple of 16.
# n_heads / head_dim repeat the ssm heads (no attention layer reads them; the tp checks do).
_MAMBA2 = dict(attention="ssm", position="none", mlp="identity", norm="rmsnorm", norm_mlp="identity", norm_eps=1e-5,
               tie_embeddings=True, max_seq_len=2048, ssm_state_size=128, ssm_n_groups=1, ssm_head_dim=64,
               ssm_expand=2, ssm_conv_kernel=4, ssm_chunk_size=256)
PRESETS["mamba2-130m"] = _p(**_MAMBA2, vocab_size=50288, d_model=768, n_layers=24, n_heads=24, head_dim=64)
PRESETS["tiny-mamba2"] = dataclasses.replace(PRESETS["mamba2-130m"], **{
    **_TINY, "d_ff": None, "n_heads": 8, "head_dim": 16, "ssm_state_size": 16, "ssm_head_dim": 16,
    "ssm_chunk_size": 16})
# DeepSeek-V3 / V2-Lite: multi-head latent attention (kv latent 512 + shared rotary key 64, interleaved rope
# pairs), YaRN x40 from 4096 with DeepSeek's mscale (softmax scale (128 + 64)^-0.5 m^2, m = 0.1 a ln 40 + 1 with
# a = mscale_all_dim; cos/sin factor m(mscale) / m(mscale_all_dim) = 1), shared experts and dense first layers.
# V3: sigmoid router, 8 groups of 32 experts (top-8 within the best 4 groups), aux-loss-free bias, weights x 2.5.
# V2-Lite: softmax router, no groups, no renormalisation, an auxiliary loss; q without a low-rank bottleneck.
_DEEPSEEK = dict(_LLAMA, attention="mla", kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                 head_dim=128, v_head_dim=128, rope_interleaved=True, rope_theta=10000.0, rope_scaling="yarn",
                 rope_scaling_factor=40.0, rope_original_max_seq_len=4096, rope_attention_factor=1.0,
                 max_seq_len=163840, norm_eps=1e-6)


def _deepseek_scale(qk: int, factor: float, mscale_all_dim: float) -> float:
    return qk ** -0.5 * (0.1 * mscale_all_dim * math.log(factor) + 1.0) ** 2


PRESETS["deepseek-v3"] = _p(**_DEEPSEEK, vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, d_ff=18432,
                            q_lora_rank=1536, attn_scale=_deepseek_scale(192, 40.0, 1.0),
                            moe=MoEConfig(n_experts=256, top_k=8, router="sigmoid", renormalize=True, d_ff=2048,
                                          n_shared_experts=1, first_dense=3, bias_update_rate=0.001, n_group=8,
                                          topk_group=4, routed_scaling_factor=2.5))
PRESETS["deepseek-v2-lite"] = _p(**_DEEPSEEK, vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, d_ff=10944,
                                 attn_scale=_deepseek_scale(192, 40.0, 0.707),
                                 moe=MoEConfig(n_experts=64, top_k=6, router="softmax", renormalize=False, d_ff=1408,
                                               n_shared_experts=2, first_dense=1, aux_loss_coef=0.001))
PRESETS["tiny-deepseek-v3"] = dataclasses.replace(PRESETS["deepseek-v3"], **{
    **_TINY, "n_layers": 3, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "head_dim": 16, "v_head_dim": 16, "rope_original_max_seq_len": 32, "rope_scaling_factor": 4.0,
    "attn_scale": _deepseek_scale(24, 4.0, 1.0)}, moe=MoEConfig(
        n_experts=8, top_k=2, router="sigmoid", renormalize=True, d_ff=32, n_shared_experts=1, first_dense=1,
        bias_update_rate=0.001, n_group=4, topk_group=2, routed_scaling_factor=2.5))

for _name, _cfg in PRESETS.items():
    _cfg.validate()
