"""Multi-head latent attention (model.attention='mla') and the DeepSeek-V3 family: logits within 1e-4
of transformers' DeepseekV3ForCausalLM (fp32; MoE layers after a dense first layer, group-limited
sigmoid routing with a perturbed selection bias and routed scaling; with q_lora_rank and without it,
V2-Lite style, with YaRN + mscale) and the bit-exact round trips of tests/test_hf_parity.py;
causality; a KV cache that holds only the latent and the rotary key; group-limited top-k against a
brute-force enumeration; the full-size presets' parameter counts against transformers' (meta device);
config errors; decoding with the cache equals recomputation (tiny-deepseek-v3 here, dense mla cases in
tests/test_kv_cache.py),
tp / pp / ep training equality in tests/test_parallel_layouts.py (tiny-deepseek-v3, slow)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

pytest.importorskip("transformers")
from tests.test_hf_parity import B, T, V  # noqa: E402
from tests.test_hf_parity import test_parity_and_round_trip as _parity_and_round_trip  # noqa: E402

from forge.config import ConfigError, ModelConfig, MoEConfig  # noqa: E402
from forge.models.hf.convert import pick_family  # noqa: E402
from forge.models.layers.mla import mla_cache_numbers  # noqa: E402
from forge.models.layers.moe_router import Router  # noqa: E402
from forge.models.presets import PRESETS  # noqa: E402
from forge.models.transformer import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes: see conftest.one_thread

SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
             qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, num_experts_per_tok=3, first_k_dense_replace=1,
             max_position_embeddings=64, num_mtp_layers=0)
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=0.707, mscale_all_dim=0.707, beta_fast=32,
             beta_slow=1, original_max_position_embeddings=16)

MLA_CASES = [
    # V3: low-rank queries, 4 groups of 2 experts with the best 2 kept, top-3, renormalised x 2.5, interleaved rope
    ("deepseek_v3-qlora-groups", "deepseek_v3", "DeepseekV3ForCausalLM",
     dict(SMALL, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    # V2-Lite style: queries without the bottleneck, no groups, no renormalisation; YaRN with mscale; rope halves
    ("deepseek_v3-noqlora-yarn", "deepseek_v3", "DeepseekV3ForCausalLM",
     dict(SMALL, q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
          rope_interleave=False, rope_parameters=_YARN, attention_bias=True)),
]


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(123)
    return torch.randint(0, V, (B, T))


@pytest.mark.parametrize("case", MLA_CASES, ids=[c[0] for c in MLA_CASES])
def test_mla_parity_and_round_trip(case, ids, tmp_path):
    _parity_and_round_trip(case, ids, tmp_path)


def _tiny():
    torch.manual_seed(0)
    model = build_model(PRESETS["tiny-deepseek-v3"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model


def test_causal():
    model = _tiny()
    a = torch.randint(0, 256, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert torch.equal(la[:, :12], lb[:, :12])
    assert (la[:, 12:] - lb[:, 12:]).abs().max() > 1e-3


def test_cache_holds_latent_and_rotary_key_only():
    model = _tiny()
    cfg = model.cfg
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 9)), cache=cache)
        model(torch.randint(0, 256, (2, 1)), cache=cache)
    for i in range(cfg.n_layers):
        assert tuple(cache.k[i].shape) == (2, 1, 10, cfg.kv_lora_rank)       # the normed latent
        assert tuple(cache.v[i].shape) == (2, 1, 10, cfg.qk_rope_head_dim)   # the rotated shared key
    assert mla_cache_numbers(cfg) == 32 + 8
    v3 = PRESETS["deepseek-v3"]
    # bf16, 61 layers: (512 + 64) * 2 bytes * 61 = 70,272 bytes per token; GQA 8 x 128 keys + values: 249,856
    assert mla_cache_numbers(v3) * 2 * v3.n_layers == 70_272
    assert 2 * 8 * 128 * 2 * v3.n_layers == 249_856


def test_tiny_deepseek_v3_decoding_with_cache_equals_recomputation():
    """The whole family (MoE layers included): logits fed one token at a time after a cached prompt
    equal the full sequence's, and greedy decoding with the cache gives the same tokens."""
    from forge.generate import generate
    model = _tiny()
    seq = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache()
        parts = [model(seq[:, :7], cache=cache)] + [model(seq[:, t:t + 1], cache=cache) for t in range(7, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    prompt = seq[:, :7]
    assert torch.equal(generate(model, prompt, 16, temperature=0.0, use_cache=True),
                       generate(model, prompt, 16, temperature=0.0, use_cache=False))


def test_group_limited_top_k_matches_enumeration():
    """The chosen experts maximise the selection score over the experts of the best topk_group groups,
    a group ranked by the sum of its 2 best scores (enumerated by hand over all group subsets)."""
    E, G, keep, k = 12, 4, 2, 3
    cfg = ModelConfig(d_model=16, moe=MoEConfig(n_experts=E, top_k=k, router="sigmoid", n_group=G, topk_group=keep,
                                                bias_update_rate=0.01, routed_scaling_factor=2.5))
    router = Router(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_()
        router.expert_bias.normal_(0, 0.3)
    x = torch.randn(64, 16)
    _, scores, idx, w = router(x)
    sel = scores + router.expert_bias
    for n in range(x.shape[0]):
        group_score = [sel[n, g * 3:(g + 1) * 3].topk(2).values.sum().item() for g in range(G)]
        best = max(itertools.combinations(range(G), keep), key=lambda gs: sum(group_score[g] for g in gs))
        allowed = [e for g in best for e in range(g * 3, (g + 1) * 3)]
        want = sorted(sorted(allowed, key=lambda e: -sel[n, e].item())[:k])
        assert sorted(idx[n].tolist()) == want
        chosen = scores[n, idx[n]]
        assert torch.allclose(w[n], 2.5 * chosen / chosen.sum())


def _hf_count(cls_cfg, cls_model, **kw) -> int:
    import transformers
    conf = getattr(transformers, cls_cfg)(**kw)
    with torch.device("meta"):
        model = getattr(transformers, cls_model)(conf)
    return sum(p.numel() for p in model.parameters())


def _yarn(m):
    return dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32, beta_slow=1, mscale=m,
                mscale_all_dim=m, original_max_position_embeddings=4096)


V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
               n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
               v_head_dim=128, qk_nope_head_dim=128, num_experts_per_tok=6, first_k_dense_replace=1,
               norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_parameters=_yarn(0.707))


def _forge_count(name) -> int:
    with torch.device("meta"):
        return build_model(PRESETS[name]).num_params()


def test_deepseek_v3_size_equals_transformers():
    """DeepSeek-V3's published config (without its multi-token-prediction layer): 671,026,404,352."""
    hf = _hf_count("DeepseekV3Config", "DeepseekV3ForCausalLM", vocab_size=129280, hidden_size=7168,
                   intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                   num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
                   kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                   n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
                   max_position_embeddings=163840, rms_norm_eps=1e-6, rope_parameters=_yarn(1.0), num_mtp_layers=0)
    assert _forge_count("deepseek-v3") == hf == 671_026_404_352


def test_deepseek_v2_lite_size_equals_transformers():
    """V2-Lite's softmax routing without groups is DeepseekV2Config's (topk_method greedy); the count is
    the same as a DeepseekV3Config of its shapes (the router kind holds no parameters): 15,706,484,224."""
    v2 = _hf_count("DeepseekV2Config", "DeepseekV2ForCausalLM", **V2_LITE, topk_method="greedy", n_group=1,
                   topk_group=1)
    v3 = _hf_count("DeepseekV3Config", "DeepseekV3ForCausalLM", **V2_LITE, n_group=1, topk_group=1, num_mtp_layers=0)
    assert _forge_count("deepseek-v2-lite") == v2 == v3 == 15_706_484_224


def test_presets_pick_deepseek_v3():
    for name in ("tiny-deepseek-v3", "deepseek-v3"):
        assert pick_family(PRESETS[name]).architecture == "DeepseekV3ForCausalLM"
    v3 = PRESETS["deepseek-v3"]
    assert math.isclose(v3.attn_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


@pytest.mark.parametrize("kw, match", [
    (dict(n_kv_heads=2), "n_kv_heads"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(qk_norm="head"), "qk_norm"),
    (dict(attention_sinks=True), "attention_sinks"),
    (dict(position="alibi"), "position"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(moe=MoEConfig(n_experts=8, n_group=3)), "n_group"),
    (dict(moe=MoEConfig(n_experts=8, n_group=4, topk_group=5)), "topk_group"),
    (dict(moe=MoEConfig(n_experts=8, top_k=5, n_group=4, topk_group=2)), "top_k"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(attention="mla", **kw).validate()
