"""Per-layer positions (model.position_pattern: NoPE layers), a rope base for sliding/local layers
(model.rope_theta_local), and the SmolLM3 / Gemma 3 / Phi-3 presets written as their HF families
(logits equal transformers'). HF -> Forge parity of the three families is in test_hf_parity.py."""
import dataclasses

import pytest
import torch

from forge.config import ConfigError, ModelConfig
from forge.models.transformer import build_model

from tests.test_parallel_layouts import cache_dir  # noqa: F401  (fixture: the tokenised shards, built once)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, max_seq_len=64), **kw}).validate()


def _randomised(cfg, seed=0):
    model = build_model(cfg, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(p.numel()))
    return model


def test_position_pattern_cycles_and_is_checked():
    cfg = _cfg(position_pattern=["rope", "rope", "none"], n_layers=7)
    assert [cfg.layer_position(i) for i in range(7)] == ["rope", "rope", "none"] * 2 + ["rope"]
    assert _cfg().layer_position(2) == "rope"
    with pytest.raises(ConfigError, match="position_pattern.*learned"):
        _cfg(position_pattern=["rope", "learned"])
    with pytest.raises(ConfigError, match=r"model.position_pattern='nope' is not one of"):
        _cfg(position_pattern=["rope", "nope"])
    with pytest.raises(ConfigError, match="non-empty"):
        _cfg(position_pattern=[])
    with pytest.raises(ConfigError, match="rotary dims"):          # rope in the pattern only: still checked
        _cfg(position="none", position_pattern=["rope", "none"], rotary_pct=0.1)
    with pytest.raises(ConfigError, match="rope_theta_local"):
        _cfg(rope_theta_local=0.0)


def test_nope_layers_are_position_free():
    """A pattern of only `none` is the NoPE model; a mixed pattern differs from both all-rope and
    all-none, and its NoPE layer holds no rotary module."""
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    rope, none = _randomised(_cfg()), _randomised(_cfg(position="none"))
    all_none, mixed = _randomised(_cfg(position_pattern=["none"])), _randomised(_cfg(position_pattern=["rope", "none"]))
    with torch.no_grad():
        out = {k: m(ids) for k, m in dict(rope=rope, none=none, all_none=all_none, mixed=mixed).items()}
    assert torch.equal(out["all_none"], out["none"])
    assert (out["mixed"] - out["rope"]).abs().max() > 1e-3 and (out["mixed"] - out["none"]).abs().max() > 1e-3
    assert [m.attn.pos is None for m in mixed.layers.values()] == [False, True, False]


def test_rope_theta_local_applies_to_sliding_layers_only_and_unscaled():
    cfg = _cfg(n_layers=2, attention_pattern=["sliding", "causal"], sliding_window=4, rope_theta=1000.0,
               rope_theta_local=10.0, rope_scaling="linear", rope_scaling_factor=4.0)
    model = build_model(cfg)
    r = cfg.rotary_dim
    base = torch.arange(0, r, 2, dtype=torch.float64) / r                     # 2i / r
    local, glob = (model.layers[str(i)].attn.pos.inv_freq.double() for i in (0, 1))
    torch.testing.assert_close(local, 10.0 ** -base, rtol=1e-6, atol=0)
    torch.testing.assert_close(glob, 1000.0 ** -base / 4.0, rtol=1e-6, atol=0)
    plain = build_model(dataclasses.replace(cfg, rope_theta_local=None))     # unset: as the global layers
    torch.testing.assert_close(plain.layers["0"].attn.pos.inv_freq, model.layers["1"].attn.pos.inv_freq)


@pytest.mark.parametrize("preset, arch", [("tiny-smollm3", "SmolLM3ForCausalLM"),
                                          ("tiny-gemma3", "Gemma3ForCausalLM"),
                                          ("tiny-phi3", "Phi3ForCausalLM")])
def test_tiny_preset_written_as_its_family_gives_transformers_logits(preset, arch, tmp_path):
    """Forge -> HF direction for the presets (NoPE every 4th layer, 5 local : 1 global with two rope bases
    and global linear scaling, fused qkv/gate_up): transformers loads the folder with equal logits."""
    from transformers import AutoModelForCausalLM
    from forge.models.hf.convert import pick_family, write_hf_folder
    from forge.models.io import unique_state_dict
    from forge.models.presets import PRESETS
    cfg = dataclasses.replace(PRESETS[preset], max_seq_len=64)
    model = _randomised(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    assert pick_family(cfg, prefer=arch).architecture == arch
    write_hf_folder(str(tmp_path / "hf"), cfg, unique_state_dict(model), torch.float32, arch=arch)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, f"{preset}: max |forge - transformers| = {diff}"


def test_phi3_longrope_is_refused_clearly():
    from forge.models.hf import UnsupportedModelError
    from forge.models.hf.families import phi3_from_hf
    d = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96, vocab_size=100,
             max_position_embeddings=256, original_max_position_embeddings=64,
             rope_scaling=dict(type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8))
    with pytest.raises(UnsupportedModelError, match="longrope"):
        phi3_from_hf(d)


def test_plan_counts_each_layers_position_buffers():
    """forge plan builds one block per kind; a NoPE layer (no inv_freq buffer) is a kind of its own."""
    from forge.config import load_config
    from forge.layout.pipeline import pipeline_specs
    from forge.parallel.groups import ParallelGroups
    from forge.plan import _build_layers
    cfg = load_config(None, ["model.preset=tiny-llama", "model.n_layers=4", "model.position_pattern=[rope,rope,rope,none]"])
    with torch.device("meta"):
        every = [sum(b.numel() * b.element_size() for b in s.build().buffers()) for s in pipeline_specs(cfg.model)]
    layers = _build_layers(cfg, ParallelGroups())
    assert [l.buffer_bytes for l in layers] == every
    assert [l.buffer_bytes for l in layers if l.block is not None][3] == 0 < layers[1].buffer_bytes



@pytest.mark.slow
def test_new_position_kinds_train_under_tp2_like_one_process(tmp_path_factory, cache_dir):
    """One short `forge train` (tests/test_parallel_layouts.py's job) of tiny-gemma3 (qk-norm, sandwich
    norms) cut to 3 layers: local (rope_theta_local), global (rope_theta, linear scaling), local NoPE:
    tp=2 gives one process's losses and final weights within 1e-5 relative. (All 6 layers of tiny-gemma3
    also match, at up to 1.6e-5 on the (1+w) norm gains, whose w start at 0: fp32 roundoff through Adam.)"""
    from tests.helpers import assert_same_training
    from tests.test_parallel_layouts import STEPS, job, run
    model = ["model.n_layers=3", "model.attention_pattern=[sliding,causal]", "model.position_pattern=[rope,rope,none]"]
    ref_losses, ref_weights, _ = run(job(str(tmp_path_factory.mktemp("ref")), cache_dir, "tiny-gemma3", 1) + model, 1)
    losses, weights, _ = run(job(str(tmp_path_factory.mktemp("tp")), cache_dir, "tiny-gemma3", 1, tp=2) + model, 2)
    assert len(losses) == STEPS
    assert_same_training(losses, weights, ref_losses, ref_weights)
