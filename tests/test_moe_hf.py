"""Hugging Face parity for the mixture-of-experts families (Mixtral, Qwen2-MoE with its gated shared
expert, Qwen3-MoE, OLMoE): logits within 1e-4 of transformers' (fp32, CPU, dropless), the written HF
folder loads in transformers with identical logits, forge -> HF -> forge bit-exact (the checks of
tests/test_hf_parity.py, run on these cases); plus the MoE presets' published sizes and the
representability errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
from tests.test_hf_parity import B, T, V  # noqa: E402
from tests.test_hf_parity import test_parity_and_round_trip as _parity_and_round_trip  # noqa: E402

from forge.models.hf import UnsupportedModelError  # noqa: E402
from forge.models.hf.convert import pick_family  # noqa: E402
from forge.models.presets import PRESETS  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes: see conftest.one_thread

SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)

MOE_CASES = [
    ("mixtral-sliding", "mixtral", "MixtralForCausalLM", dict(SMALL, num_local_experts=4, sliding_window=8)),
    # layer 0 dense (decoder_sparse_step=2), gated shared expert, q/k/v biases, no top-k renormalisation
    ("qwen2_moe-shared-sparse-step", "qwen2_moe", "Qwen2MoeForCausalLM",
     dict(SMALL, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40, decoder_sparse_step=2)),
    # mlp_only_layers=[0], renormalised top-k, per-head qk-norm, sliding window
    ("qwen3_moe-mlp-only-renorm", "qwen3_moe", "Qwen3MoeForCausalLM",
     dict(SMALL, num_hidden_layers=3, num_experts=4, moe_intermediate_size=24, mlp_only_layers=[0],
          norm_topk_prob=True, use_sliding_window=True, sliding_window=8)),
    # sinks, alternating sliding / full layers, yarn, attention and expert biases, router bias, fused and
    # interleaved gate_up_proj, clamped experts (limit 0.1 binds at these weight sizes)
    ("gpt_oss-sinks-yarn-clamped", "gpt_oss", "GptOssForCausalLM",
     dict(SMALL, head_dim=8, num_local_experts=4, sliding_window=8, swiglu_limit=0.1,
          layer_types=["sliding_attention", "full_attention"],
          rope_parameters=dict(rope_type="yarn", rope_theta=500.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                               truncate=False, original_max_position_embeddings=16))),
    ("olmoe-fullqknorm-top3", "olmoe", "OlmoeForCausalLM", dict(SMALL, num_experts=4, num_experts_per_tok=3)),
]


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(123)
    return torch.randint(0, V, (B, T))


@pytest.mark.parametrize("case", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_moe_parity_and_round_trip(case, ids, tmp_path):
    _parity_and_round_trip(case, ids, tmp_path)


PUBLISHED = {"gpt-oss-20b": 20_914_757_184, "gpt-oss-120b": 116_829_156_672,
             "mixtral-8x7b": 46_702_792_704, "qwen3-moe-30b-a3b": 30_532_122_624, "olmoe-1b-7b": 6_919_161_856}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_preset_sizes(name):
    from forge.models import build_model
    with torch.device("meta"):
        model = build_model(PRESETS[name])
    assert model.num_params() == PUBLISHED[name]


@pytest.mark.parametrize("name, arch", [("tiny-mixtral", "MixtralForCausalLM"),
                                        ("tiny-qwen3-moe", "Qwen3MoeForCausalLM"),
                                        ("tiny-olmoe", "OlmoeForCausalLM"),
                                        ("tiny-gpt-oss", "GptOssForCausalLM"),
                                        ("gpt-oss-20b", "GptOssForCausalLM"),
                                        ("mixtral-8x7b", "MixtralForCausalLM"),
                                        ("qwen3-moe-30b-a3b", "Qwen3MoeForCausalLM"),
                                        ("olmoe-1b-7b", "OlmoeForCausalLM")])
def test_presets_pick_their_family(name, arch):
    assert pick_family(PRESETS[name]).architecture == arch


def test_unrepresentable_moe():
    base = PRESETS["tiny-mixtral"]
    for change, fragment in [(dict(renormalize=False), "moe_renormalize"), (dict(router="sigmoid"), "moe_router"),
                             (dict(bias_update_rate=0.01), "moe_router_bias"), (dict(first_dense=1), "moe_layers")]:
        cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, **change))
        with pytest.raises(UnsupportedModelError, match=fragment):
            pick_family(cfg, prefer="MixtralForCausalLM")
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts family"):
        pick_family(PRESETS["tiny-llama"], prefer="MixtralForCausalLM")
    # a capacity factor and the loss coefficients are training-time settings: still Mixtral
    cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, capacity_factor=1.25, z_loss_coef=1e-3))
    assert pick_family(cfg).architecture == "MixtralForCausalLM"



def test_convert_cli_both_ways(tmp_path):
    """A Forge MoE model -> `forge convert --to hf` -> transformers (same logits) -> `--from hf`:
    bit-exact weights (a capacity factor is a training setting: the export is dropless)."""
    from transformers import AutoModelForCausalLM

    from forge.models import build_model
    from forge.models.hf.convert import main
    from forge.models.io import load_model_folder, model_config_dict, save_model_folder, unique_state_dict
    base = PRESETS["tiny-mixtral"]
    cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, capacity_factor=1.0))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    src, hf_dir, back = (str(tmp_path / n) for n in ("forge", "hf", "back"))
    save_model_folder(model, model_config_dict(cfg), src)
    assert main(["--to", "hf", "--input", src, "--output", hf_dir]) == 0
    assert main(["--from", "hf", "--input", hf_dir, "--output", back]) == 0
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4
    model2, _ = load_model_folder(back)
    a, b = unique_state_dict(model), unique_state_dict(model2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
