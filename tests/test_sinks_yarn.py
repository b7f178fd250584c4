"""Attention sinks (model.attention_sinks) and YaRN rope scaling (model.rope_scaling=yarn): the sink's
closed form on a hand-made case, forge's attention against transformers' gpt-oss eager attention
(sinks, GQA, causal and sliding masks, query chunks), causality, KV-cache decoding vs recomputation,
YaRN's frequencies, attention factor and rotated q/k against transformers, config errors, forge
plan's parameter count at tp=2, and the HF export refusing sinks for a family without them."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from forge.config import ConfigError, ModelConfig, load_config
from forge.models import build_model
from forge.models.layers.attention import AttnSpec, softmax_attention
from forge.models.layers.position import Rotary, rope_attention_factor, rope_inv_freq
from forge.models.layers.scores import Sinks, sink_softmax
from tests.helpers import assert_cache_decoding_equals_recomputation, assert_causal

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64)
SINKS = dict(attention_sinks=True, n_kv_heads=2, attention_pattern=["sliding", "causal"], sliding_window=5,
             attention_chunk=4, qkv_bias=True, attn_out_bias=True)
YARN = dict(rope_scaling="yarn", rope_scaling_factor=8.0, rope_original_max_seq_len=16, rope_theta=500.0)


def test_sink_softmax_closed_form_on_a_hand_made_case():
    """One head, one query seeing keys 0 and 1 (key 2 masked): p_j = e^s_j / (e^z + e^s_0 + e^s_1)."""
    s = torch.tensor([[[[1.0, 2.0, 30.0]]]])                       # (B=1, H=1, Tq=1, Tk=3)
    allowed = torch.tensor([[True, True, False]])
    z = torch.tensor([0.5])
    p = sink_softmax(s, allowed, z)
    d = math.exp(0.5) + math.exp(1.0) + math.exp(2.0)
    torch.testing.assert_close(p[0, 0, 0], torch.tensor([math.exp(1.0) / d, math.exp(2.0) / d, 0.0]))
    assert p[0, 0, 0, 2] == 0.0
    assert abs(p.sum().item() - (1 - math.exp(0.5) / d)) < 1e-6    # the sink's share goes nowhere
    # a very negative sink gives the plain softmax back; a large one drives the weights to 0
    torch.testing.assert_close(sink_softmax(s, allowed, torch.tensor([-1e4]))[0, 0, 0, :2],
                               torch.softmax(torch.tensor([1.0, 2.0]), 0))
    assert sink_softmax(s, allowed, torch.tensor([40.0])).sum() < 1e-10


def _attn_stub(kind, n_heads, window, chunk, sinks):
    return AttnSpec(kind=kind, scale=0.3, sinks=(Sinks(n_heads) if sinks is None else sinks).weight,
                    sliding_window=window, chunk=chunk)


@pytest.mark.parametrize("kind, H, Hkv, chunk, offset", [("causal", 4, 2, 3, 0), ("sliding", 4, 1, 4, 0),
                                                          ("causal", 4, 4, 64, 5), ("sliding", 2, 2, 2, 6)])
def test_attention_with_sinks_equals_transformers_gpt_oss_eager(kind, H, Hkv, chunk, offset):
    """forge's chunked sink attention vs transformers' gpt-oss eager_attention_forward given the same
    q, k, v, sinks and the additive mask (offset > 0: queries are the last tokens, as with a cache)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    g = torch.Generator().manual_seed(H * 10 + chunk + offset)
    Tk, window = 11, 4
    Tq = Tk - offset
    q, k, v = (torch.randn(2, h, t, 8, generator=g) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    sinks = Sinks(H)
    with torch.no_grad():
        sinks.weight.copy_(torch.randn(H, generator=g) * 2)
    qpos, kpos = torch.arange(offset, Tk), torch.arange(Tk)
    attn = _attn_stub(kind, H, window, chunk, sinks)
    ours = softmax_attention(q, k, v, qpos, kpos, attn)                  # (B, H, Tq, hd)
    diff = qpos[:, None] - kpos[None]
    ok = (diff >= 0) & ((diff < window) if kind == "sliding" else True)
    mask = torch.zeros(Tq, Tk).masked_fill(~ok, float("-inf"))[None, None]
    module = SimpleNamespace(sinks=sinks.weight.detach(), num_key_value_groups=H // Hkv, training=False)
    ref, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.3)        # (B, Tq, H, hd)
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def model_of(**kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.12)
            elif n.endswith("sinks.weight"):                         # sinks that differ by head
                p.copy_(torch.linspace(-1.0, 2.0, p.numel()))
    return model


CASES = {"sinks": SINKS, "sinks-yarn": {**SINKS, **YARN}, "yarn": YARN}


@pytest.mark.parametrize("name", sorted(CASES))
def test_causal_changing_token_t_never_changes_logits_before_t(name):
    assert_causal(model_of(**CASES[name]), seq_len=20, t=11)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cache_decoding_equals_recomputation(name):
    assert_cache_decoding_equals_recomputation(model_of(**CASES[name]), new_tokens=8)


def test_sinks_change_the_output_and_train():
    """The sinks are used (changing them changes the logits) and receive gradients."""
    model = model_of(**SINKS)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    sinks = [p for n, p in model.named_parameters() if n.endswith("attn.sinks.weight")]
    assert len(sinks) == 2 and all(p.shape == (4,) and p.grad.abs().min() > 0 for p in sinks)
    before = model(ids).detach()
    with torch.no_grad():
        sinks[0].add_(1.0)
    assert (model(ids) - before).abs().max() > 1e-4


@pytest.mark.parametrize("truncate, factor, attention_factor", [(False, 32.0, None), (True, 8.0, None),
                                                                (False, 4.0, 1.25)])
def test_yarn_frequencies_and_attention_factor_equal_transformers(truncate, factor, attention_factor):
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import _compute_yarn_parameters
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, apply_rotary_pos_emb
    rope = {"rope_type": "yarn", "factor": factor, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
            "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
    if attention_factor is not None:
        rope["attention_factor"] = attention_factor
    hf = GptOssConfig(hidden_size=128, num_attention_heads=2, head_dim=64, rope_parameters=rope)
    inv, mscale = _compute_yarn_parameters(hf)
    cfg = ModelConfig(**{**BASE, "d_model": 128, "n_heads": 2, "rope_scaling": "yarn", "rope_theta": 150000.0,
                         "rope_scaling_factor": factor, "rope_original_max_seq_len": 4096,
                         "rope_yarn_truncate": truncate, "rope_attention_factor": attention_factor}).validate()
    torch.testing.assert_close(rope_inv_freq(cfg), inv, atol=0, rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(mscale, rel=1e-12)
    # the rotated q, k: cos and sin carry the attention factor on both (scores scale by its square)
    q, k = torch.randn(1, 2, 9, 64), torch.randn(1, 1, 9, 64)
    pos = torch.arange(100, 109)
    cos, sin = GptOssRotaryEmbedding(hf)(q, pos[None])
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    ours = Rotary(cfg)(q, k, pos)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_sinks=True, attention_softmax="consmax"), "model.attention_sinks"),
    (dict(attention_sinks=True, attention="linear"), "model.attention_sinks"),
    (dict(rope_scaling="ntk"), "model.rope_scaling"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**BASE, **overrides}).validate()


def test_unused_keys_follow_the_scaling():
    from forge.config import unused_keys
    cfg = load_config(None, ["model.rope_scaling=yarn"])
    unused = unused_keys(cfg)
    assert "model.rope_yarn_beta_fast" not in unused and "model.rope_original_max_seq_len" not in unused
    assert "model.rope_low_freq_factor" in unused
    assert "model.rope_yarn_beta_fast" in unused_keys(load_config(None, ["model.rope_scaling=llama3"]))


@pytest.fixture
def no_process_group():
    from forge.train.distributed import shutdown
    shutdown()


def test_plan_counts_the_sinks(no_process_group):
    """n_heads sinks per attention layer; forge plan at tp=2 counts them like the model."""
    from forge.models.transformer import Transformer
    from forge.plan import plan
    cfg = load_config(None, ["model.preset=tiny-llama", "model.attention_sinks=true", "model.n_kv_heads=2",
                             "model.attention_pattern=[causal,identity]", "parallel.tp=2"])
    with torch.device("meta"):
        one = Transformer(cfg.model)
    L = sum(cfg.model.layer_attention(i) != "identity" for i in range(cfg.model.n_layers))
    assert sum(p.numel() for n, p in one.named_parameters() if "sinks" in n) == cfg.model.n_heads * L
    result = plan(cfg, 2)
    assert result["params"] == one.num_params()
    assert sum(r["model_params"] for r in result["ranks"]) == one.num_params()


def test_hugging_face_export_refuses_sinks_for_llama_and_keeps_yarn():
    """Llama has no sinks: export names the field; YaRN (with every knob) round trips through Llama's config
    (its logits against transformers: test_hf_parity.py's llama-yarn case)."""
    from forge.models.hf.families import FAMILIES, representation_errors
    from forge.models.presets import PRESETS
    llama = FAMILIES["LlamaForCausalLM"]
    errs = representation_errors(llama, dataclasses.replace(PRESETS["tiny-llama"], attention_sinks=True))
    assert errs and "attention_sinks" in errs[0]
    yarn = dict(YARN, rope_yarn_beta_fast=16.0, rope_yarn_beta_slow=2.0, rope_yarn_truncate=False,
                rope_attention_factor=1.5)
    assert representation_errors(llama, dataclasses.replace(PRESETS["tiny-llama"], **yarn)) == []
