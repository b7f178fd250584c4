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

Where things are: the spec types and config helpers in common.py; the families in llama.py (Llama,
Mistral, Qwen2/3, SmolLM3, Granite, BitNet), gemma.py, olmo.py, gpt.py (GPT-2, GPT-NeoX, GPT-J, Phi,
Phi-3), moe.py (Mixtral, Qwen-MoE, OLMoE, gpt-oss), deepseek.py, mamba2.py; `canonical` and
`representation_errors` in canonical.py. This module is the registry, and re-exports the names other
code imports from it.
"""
from __future__ import annotations

# canonical, representation_errors, Transform, UnsupportedModelError, hf_config_object: re-exported (imported from here)
from forge.models.hf.canonical import canonical, representation_errors  # noqa: F401
from forge.models.hf.common import FamilySpec, Transform, UnsupportedModelError, hf_config_object  # noqa: F401
from forge.models.hf.deepseek import DEEPSEEK_V3
from forge.models.hf.gemma import (gemma2_from_hf, gemma2_map, gemma2_to_hf, gemma3_from_hf, gemma3_to_hf,
                                   gemma_from_hf, gemma_to_hf)
from forge.models.hf.gpt import (GPT2_IGNORE, gpt2_from_hf, gpt2_rules, gpt2_to_hf, gptj_from_hf, gptj_map,
                                 gptj_to_hf, neox_from_hf, neox_rules, neox_to_hf, phi3_from_hf, phi3_rules,
                                 phi3_to_hf, phi_from_hf, phi_map, phi_to_hf)
from forge.models.hf.llama import (LLAMA_IGNORE, bitnet_from_hf, bitnet_map, bitnet_to_hf, granite_from_hf,
                                   granite_to_hf, llama_from_hf, llama_map, llama_to_hf, mistral_from_hf,
                                   mistral_to_hf, qwen2_from_hf, qwen2_to_hf, qwen3_from_hf, qwen3_to_hf,
                                   smollm3_from_hf, smollm3_to_hf)
from forge.models.hf.mamba2 import MAMBA2
from forge.models.hf.moe import (gpt_oss_from_hf, gpt_oss_rules, gpt_oss_to_hf, mixtral_from_hf, mixtral_rules,
                                 mixtral_to_hf, olmoe_from_hf, olmoe_to_hf, qwen2_moe_from_hf, qwen2_moe_to_hf,
                                 qwen3_moe_from_hf, qwen3_moe_to_hf, qwen_moe_rules)
from forge.models.hf.olmo import olmo2_from_hf, olmo2_map, olmo2_to_hf, olmo_from_hf, olmo_to_hf


# ---------------------------------------------------------------- the registry
def _spec(arch, model_type, from_hf, to_hf, key_map, transforms=(), ignore=LLAMA_IGNORE, base_prefix="model.",
          tied_hf_keys=("lm_head.weight",), aliases=None):
    return FamilySpec(arch, model_type, from_hf, to_hf, key_map, list(transforms), tuple(ignore), base_prefix,
                      tuple(tied_hf_keys), dict(aliases or {}))


_gpt2_map, _gpt2_tf = gpt2_rules()
_neox_map, _neox_tf = neox_rules()


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
    DEEPSEEK_V3.architecture: DEEPSEEK_V3,     # deepseek.py
    MAMBA2.architecture: MAMBA2,               # mamba2.py
}
