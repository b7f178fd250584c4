"""Presets: parameter counts equal the published sizes of the real models (counted on the meta
device, nothing allocated), and each tiny preset runs."""
import pytest
import torch

from forge.models import build_model
from forge.models.presets import PRESETS

# Parameter counts published for the Hugging Face checkpoints of each model.
PUBLISHED = {
    "gpt2-124m": 124_439_808, "gpt2-355m": 354_823_168, "gpt2-774m": 774_030_080,
    "gpt2-1.5b": 1_557_611_200, "llama1-7b": 6_738_415_616, "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400, "mistral-7b": 7_241_732_096,
    "qwen2-0.5b": 494_032_768, "qwen3-0.6b": 596_049_920, "gemma-2b": 2_506_172_416,
    "gemma2-2b": 2_614_341_888, "phi-2": 2_779_683_840, "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016, "pythia-1b": 1_011_781_632, "gpt-j-6b": 6_050_882_784,
    "olmo-1b": 1_176_764_416, "olmo2-1b": 1_484_916_736, "llama3-70b": 70_553_706_496,
    "smollm3-3b": 3_075_098_624,                              # SmolLM3-3B ("3.08B")
    # gemma-3-1b-pt; gemma-3-4b's language model alone (the 4.30B checkpoint less its SigLIP tower and
    # projector: transformers' Gemma3ForCausalLM built on that text config on the meta device)
    "gemma3-1b": 999_885_952, "gemma3-4b": 3_880_263_168,
    "phi3-mini": 3_821_079_552,                               # Phi-3-mini-4k-instruct ("3.82B")
    "granite-3.0-2b": 2_533_531_648, "granite-3.0-8b": 8_170_848_256,
    # transformers' GptOssForCausalLM on the meta device with the published configs ("21B", "117B")
    "gpt-oss-20b": 20_914_757_184, "gpt-oss-120b": 116_829_156_672,
    # transformers' Mamba2ForCausalLM on the meta device with state-spaces/mamba2-130m's config (tied)
    "mamba2-130m": 128_989_632,
    # transformers' BitNetForCausalLM on the meta device with microsoft/bitnet-b1.58-2B-4T's config (tied, "2.4B")
    "bitnet-b1.58-2b": 2_412_820_480,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = build_model(PRESETS[name])
    assert model.num_params() == PUBLISHED[name]


# The architecture fields of the published config.json of each checkpoint (huggyllama/llama-7b,
# meta-llama/Llama-2-7b-hf, Meta-Llama-3-8B, Llama-3.2-1B); absent keys take transformers' defaults.
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "num_attention_heads": 32, "tie_word_embeddings": False}
PUBLISHED_CONFIGS = {
    "llama1-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, max_position_embeddings=2048,
                      num_hidden_layers=32, rms_norm_eps=1e-06, vocab_size=32000),
    "llama2-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, max_position_embeddings=4096,
                      num_hidden_layers=32, num_key_value_heads=32, rms_norm_eps=1e-05, rope_scaling=None,
                      vocab_size=32000),
    "llama3-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, max_position_embeddings=8192,
                      num_hidden_layers=32, num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=500000.0,
                      vocab_size=128256),
    "llama3.2-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, max_position_embeddings=131072,
                        num_hidden_layers=16, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-05,
                        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                        rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_llama_presets_are_their_published_configs(name):
    """Each Llama preset is what the conversion family reads from that checkpoint's published
    config.json, field for field (context length, rope theta and scaling, vocabulary, GQA, eps,
    tying): the versions differ where the real ones do."""
    from forge.models.hf.families import FAMILIES, canonical
    read = FAMILIES["LlamaForCausalLM"].config_from_hf(PUBLISHED_CONFIGS[name])
    assert canonical(PRESETS[name]) == canonical(read)


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("tiny-")))
def test_tiny_presets_train_one_step(name):
    torch.manual_seed(0)
    model = build_model(PRESETS[name])
    ids = torch.randint(0, PRESETS[name].vocab_size, (2, 33))
    loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
