"""Hugging Face parity: for every family transformers implements, a tiny random HF model (built from
a config, no download) converts to Forge with logits equal within 1e-4 (fp32, CPU), writes back to
an HF folder that transformers loads with the same logits, and forge -> HF -> forge is bit-exact.
Plus the errors: unsupported architecture, missing / unexpected tensor, shape mismatch, offline hub id.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from forge.models.hf import FAMILIES, UnsupportedModelError  # noqa: E402
from forge.models.hf.convert import (config_from_hf_folder, from_pretrained, pick_family,  # noqa: E402
                                     write_hf_folder)
from forge.models.hf.families import canonical  # noqa: E402
from forge.models.io import unique_state_dict  # noqa: E402

V, T, B = 160, 24, 2
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

MAMBA2 = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, expand=2,
              conv_kernel=4)

# (case id, model_type, architecture, config kwargs): family features on, GQA where supported,
# sliding windows smaller than T, partial rotary, biases, qk norms, tied and untied heads.
CASES = [
    ("llama-llama3rope", "llama", "LlamaForCausalLM",
     dict(LLAMA, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=16))),
    ("llama-yarn", "llama", "LlamaForCausalLM",
     dict(LLAMA, rope_parameters=dict(rope_type="yarn", rope_theta=500.0, factor=8.0, beta_fast=16.0, beta_slow=1.0,
                                      truncate=False, original_max_position_embeddings=16))),
    ("llama-bias-tied-linear", "llama", "LlamaForCausalLM",
     dict(LLAMA, num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
          rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    ("mistral-sliding", "mistral", "MistralForCausalLM", dict(LLAMA, sliding_window=8)),
    ("qwen2-bias-window-tied", "qwen2", "Qwen2ForCausalLM",
     dict(LLAMA, use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=True)),
    ("qwen3-qknorm-headdim", "qwen3", "Qwen3ForCausalLM", dict(LLAMA, head_dim=32)),
    ("gemma-mqa", "gemma", "GemmaForCausalLM", dict(LLAMA, num_key_value_heads=1, head_dim=16)),
    ("gemma2-softcap-window", "gemma2", "Gemma2ForCausalLM",
     dict(LLAMA, head_dim=16, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
          final_logit_softcapping=3.0)),
    ("gpt2-tied", "gpt2", "GPT2LMHeadModel",
     dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    ("gpt_neox-partial-rotary", "gpt_neox", "GPTNeoXForCausalLM",
     dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64, rotary_pct=0.25)),
    ("gpt_neox-sequential-nobias", "gpt_neox", "GPTNeoXForCausalLM",
     dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=False, attention_bias=False)),
    ("gptj-interleaved", "gptj", "GPTJForCausalLM",
     dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8)),
    ("phi-qk-layernorm", "phi", "PhiForCausalLM",
     dict(LLAMA, partial_rotary_factor=0.5, qk_layernorm=True)),
    ("olmo-clip-qkv", "olmo", "OlmoForCausalLM", dict(LLAMA, clip_qkv=0.5)),
    ("olmo2", "olmo2", "Olmo2ForCausalLM", dict(LLAMA)),
    # NoPE on every 2nd layer (no_rope_layer_interval), sliding windows on the NoPE layers
    ("smollm3-nope-window", "smollm3", "SmolLM3ForCausalLM",
     dict(LLAMA, num_hidden_layers=3, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8,
          pad_token_id=0, bos_token_id=1, eos_token_id=2,
          rope_parameters=dict(rope_type="default", rope_theta=500.0))),
    # 1 global : 1 local, linear rope scaling on global layers only, own rope base on local layers
    ("gemma3-qknorm-local-rope", "gemma3_text", "Gemma3ForCausalLM",
     dict(LLAMA, num_hidden_layers=3, head_dim=16, sliding_window=8, sliding_window_pattern=2,
          query_pre_attn_scalar=24, rope_parameters={
              "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=5000.0),
              "sliding_attention": dict(rope_type="default", rope_theta=50.0)})),
    # fused qkv_proj / gate_up_proj; partial rotary (Phi-4-mini) and a window, which no Llama-like family holds
    ("phi3-fused-partial-window", "phi3", "Phi3ForCausalLM",
     dict(LLAMA, sliding_window=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
          rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.5))),
    ("granite-multipliers-tied", "granite", "GraniteForCausalLM",
     dict(LLAMA, embedding_multiplier=3.0, residual_multiplier=0.3, attention_multiplier=0.0625,
          logits_scaling=5.0, tie_word_embeddings=True, attention_bias=True)),
    # Mamba-2 (attention kind ssm, no MLP): one group, biases, a chunk that does not divide T; two groups,
    # tied, no conv bias, a clamped time step
    ("mamba2-groups1-bias-chunk10", "mamba2", "Mamba2ForCausalLM",
     dict(MAMBA2, n_groups=1, chunk_size=10, use_bias=True)),
    ("mamba2-groups2-tied-clamped", "mamba2", "Mamba2ForCausalLM",
     dict(MAMBA2, n_groups=2, chunk_size=8, use_conv_bias=False, tie_word_embeddings=True,
          time_step_limit=(0.01, 0.5))),
    # relu2 GLU, RMSNorm sub-norms before o_proj and down_proj (plain weights: no quantization_config)
    ("bitnet-subnorms-bias", "bitnet", "BitNetForCausalLM",
     dict(LLAMA, hidden_act="relu2", attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
]

DIFFS: dict[str, float] = {}


def make_hf_model(model_type: str, arch: str, kwargs: dict, seed: int = 0):
    conf = AutoConfig.for_model(model_type, architectures=[arch], **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").eval()
    with torch.no_grad():       # larger random weights; norm weights and biases away from 1 / 0
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
            else:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():     # DeepSeek-V3's selection bias: a buffer, 0 at init
            if name.endswith("e_score_correction_bias"):
                b.add_(0.2 * torch.randn_like(b))
    return model


def save_hf(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(123)
    return torch.randint(0, V, (B, T))


def test_every_family_has_a_case():
    from tests.test_mla import MLA_CASES         # DeepSeek-V3 (latent attention) is covered there
    from tests.test_moe_hf import MOE_CASES      # the mixture-of-experts families are covered there
    assert {arch for _, _, arch, _ in CASES + MOE_CASES + MLA_CASES} == set(FAMILIES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_and_round_trip(case, ids, tmp_path):
    name, model_type, arch, kwargs = case
    hf = make_hf_model(model_type, arch, kwargs)
    hf_dir = save_hf(hf, str(tmp_path / "hf"))
    with torch.no_grad():
        ref = hf(ids).logits

    # HF -> Forge: same logits
    model = from_pretrained(hf_dir)
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (B, T, V)
    diff = (out - ref).abs().max().item()
    DIFFS[name] = diff
    print(f"\n{name}: max |forge - transformers| = {diff:.2e}")
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"

    # Forge -> HF: the same architecture is chosen, transformers loads it, logits identical
    cfg = model.cfg
    assert pick_family(cfg).architecture == arch
    sd = unique_state_dict(model)
    hf2_dir = str(tmp_path / "hf2")
    write_hf_folder(hf2_dir, cfg, sd, torch.float32)
    assert json.load(open(os.path.join(hf2_dir, "config.json")))["architectures"] == [arch]
    assert os.path.isfile(os.path.join(hf2_dir, "generation_config.json"))
    hf2 = AutoModelForCausalLM.from_pretrained(hf2_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref2 = hf2(ids).logits
    assert torch.equal(ref2, ref), f"{name}: re-exported HF model differs: {(ref2 - ref).abs().max()}"

    # HF -> Forge -> HF and Forge -> HF -> Forge are bit-exact
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(hf2_dir, "model.safetensors"))
    tied = [k for k in set(a) - set(b) if cfg.tie_embeddings and k == "lm_head.weight"]
    assert set(a) - set(tied) == set(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    _, cfg2, _ = config_from_hf_folder(hf2_dir)
    assert canonical(cfg2) == canonical(cfg)
    model2 = from_pretrained(hf2_dir)
    sd2 = unique_state_dict(model2)
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


# ---------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama"))
    return save_hf(make_hf_model("llama", "LlamaForCausalLM", LLAMA), d)


def _copy_with(src, dst, edit_sd=None, edit_cfg=None):
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if edit_cfg:
        edit_cfg(cfg)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    sd = load_file(os.path.join(src, "model.safetensors"))
    if edit_sd:
        edit_sd(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    return dst


def test_unsupported_architecture(llama_dir, tmp_path):
    d = _copy_with(llama_dir, str(tmp_path / "x"), edit_cfg=lambda c: c.update(architectures=["FooForCausalLM"]))
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM"):
        from_pretrained(d)


def test_unsupported_rope_type(llama_dir, tmp_path):
    d = _copy_with(llama_dir, str(tmp_path / "x"), edit_cfg=lambda c: c.update(
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)))
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        from_pretrained(d)


def test_missing_tensor(llama_dir, tmp_path):
    key = "model.layers.1.self_attn.k_proj.weight"
    d = _copy_with(llama_dir, str(tmp_path / "x"), edit_sd=lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"):
        from_pretrained(d)


def test_unexpected_tensor(llama_dir, tmp_path):
    d = _copy_with(llama_dir, str(tmp_path / "x"), edit_sd=lambda sd: sd.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.extra\.weight'\]"):
        from_pretrained(d)


def test_shape_mismatch(llama_dir, tmp_path):
    key = "model.layers.0.mlp.up_proj.weight"
    d = _copy_with(llama_dir, str(tmp_path / "x"), edit_sd=lambda sd: sd.update({key: torch.zeros(80, 64)}))
    with pytest.raises(ValueError) as e:
        from_pretrained(d)
    msg = str(e.value)
    assert key in msg and "(80, 64)" in msg and "(96, 64)" in msg, msg


def test_tied_head_copy_must_match(llama_dir, tmp_path):
    def tie(c):
        c["tie_word_embeddings"] = True
    def same(sd):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    d = _copy_with(llama_dir, str(tmp_path / "ok"), edit_sd=same, edit_cfg=tie)
    assert from_pretrained(d).cfg.tie_embeddings          # a saved copy equal to the embedding is accepted
    d = _copy_with(llama_dir, str(tmp_path / "bad"), edit_cfg=tie)   # lm_head.weight differs: refused
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_pretrained(d)


def test_unrepresentable_forge_model():
    from forge.config import ModelConfig
    cfg = ModelConfig(attention="linear").validate()
    with pytest.raises(UnsupportedModelError, match="attention"):
        pick_family(cfg)
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM"):
        pick_family(ModelConfig().validate(), prefer="Qwen3ForCausalLM")


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    t0 = time.time()
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        from_pretrained("someorg/some-model-that-is-not-cached")
    assert time.time() - t0 < 10


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained("./no/such/folder")


def test_gpt2_legacy_layout(tmp_path, ids):
    """Original GPT-2 checkpoints: base-model keys without `transformer.`, plus attn.bias mask buffers."""
    hf = make_hf_model("gpt2", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    d = save_hf(hf, str(tmp_path / "hf"))

    def legacy(sd):
        items = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
        sd.clear()
        sd.update(items)
        for i in range(2):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    d2 = _copy_with(d, str(tmp_path / "legacy"), edit_sd=legacy)
    with torch.no_grad():
        assert (from_pretrained(d2)(ids) - hf(ids).logits).abs().max() <= 1e-4
