"""KV-cached decoding equals recomputing the whole sequence, for every position encoding and
attention kind: token-exact greedy decoding, and logits within 1e-5 when the sequence is fed
incrementally (one token, or a few tokens, at a time) after a cached prompt."""
import pytest
import torch

from forge.config import ModelConfig
from forge.generate import generate
from forge.models.transformer import build_model


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes: see conftest.one_thread


VOCAB, PROMPT, NEW = 97, 7, 24

CASES = {
    "rope": dict(position="rope"),
    "rope-interleaved-partial": dict(position="rope", rope_interleaved=True, rotary_pct=0.5),
    "alibi": dict(position="alibi"),
    "learned": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal"),
    "none": dict(position="none"),
    # windows smaller than the generated length, so the window slides during decoding
    "sliding": dict(attention="sliding", sliding_window=5),
    "sliding-alibi": dict(attention="sliding", sliding_window=4, position="alibi"),
    "local": dict(attention="local", local_window=4),
    "linear": dict(attention="linear"),
    # Mamba-2 layers (their conv inputs and scan state cached) mixed with attention; chunk < prompt
    "ssm-hybrid": dict(attention_pattern=["ssm", "causal"], ssm_head_dim=8, ssm_state_size=8, ssm_chunk_size=4,
                       ssm_n_groups=2),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "pattern-sliding-causal": dict(attention_pattern=["sliding", "causal"], sliding_window=3),
    "softcap": dict(attention="sliding", sliding_window=6, attn_softcap=5.0, logit_softcap=10.0),
    "qk-norm": dict(qk_norm="head"),
    "parallel-block": dict(block="parallel", norm="layernorm"),
    "nope-pattern": dict(position_pattern=["rope", "none"]),
    # latent attention: the cache holds the latent and the rotary key; keys/values re-expanded each step
    "mla": dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=12, rope_interleaved=True),
    "mla-noqlora-yarn-mixed": dict(attention_pattern=["mla", "causal"], kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=4, rope_scaling="yarn", rope_scaling_factor=4.0,
                                   rope_original_max_seq_len=16),
    "rope-theta-local": dict(attention_pattern=["sliding", "causal"], sliding_window=4, rope_theta_local=100.0,
                             rope_scaling="linear", rope_scaling_factor=4.0),
}


def tiny_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64), **kw})
    model = build_model(cfg).eval()
    with torch.no_grad():     # larger weights than the default init: logits that vary with the context
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.12)
    return model


def _cases():
    out = [pytest.param(kw, id=name) for name, kw in CASES.items()]
    try:
        from forge.models.presets import PRESETS
    except ImportError:
        return out
    for name, cfg in sorted(PRESETS.items()):
        if name.startswith("tiny-") and not cfg.moe.n_experts:
            out.append(pytest.param({"preset": name}, id=name))
    return out


def _model(kw):
    if "preset" in kw:
        import dataclasses
        from forge.models.presets import PRESETS
        cfg = dataclasses.replace(PRESETS[kw["preset"]], vocab_size=VOCAB, max_seq_len=64,
                                  dropout=0.0, attn_dropout=0.0)
        for key in ("sliding_window", "local_window"):
            if getattr(cfg, key):
                setattr(cfg, key, min(getattr(cfg, key), 5))
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.12)
        return model
    return tiny_model(**kw)


@pytest.mark.parametrize("kw", _cases())
def test_greedy_with_cache_equals_recompute(kw):
    model = _model(kw)
    ids = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    cached = generate(model, ids, NEW, temperature=0.0, use_cache=True)
    full = generate(model, ids, NEW, temperature=0.0, use_cache=False)
    assert cached.shape == (2, PROMPT + NEW)
    assert torch.equal(cached[:, :PROMPT], ids)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("kw", _cases())
def test_incremental_logits_equal_full_sequence(kw, chunk):
    model = _model(kw)
    if model.cfg.quant.linear != "linear":
        # a quantiser's code is a step function of its input: in fp32 a last-bit difference between the
        # full and the chunked matmuls can flip one code (on some CPUs it does); in fp64 none comes near
        model = model.double()
    seq = torch.randint(0, VOCAB, (2, PROMPT + NEW), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache()
        parts = [model(seq[:, :PROMPT], cache=cache)]
        for t in range(PROMPT, seq.shape[1], chunk):
            parts.append(model(seq[:, t:t + chunk], cache=cache))
        incremental = torch.cat(parts, dim=1)
    assert cache.length == seq.shape[1]
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


def test_sliding_window_really_limits_attention():
    """Guard for the tests above: with a window of 2 the last logits do not depend on early tokens."""
    model = tiny_model(attention="sliding", sliding_window=2, n_layers=1)
    a = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[0, :5] = (b[0, :5] + 1) % VOCAB
    with torch.no_grad():
        la, lb = model(a)[:, -1], model(b)[:, -1]
    torch.testing.assert_close(la, lb)
    with torch.no_grad():
        cache = model.new_cache()
        model(b[:, :-1], cache=cache)
        torch.testing.assert_close(model(b[:, -1:], cache=cache)[:, -1], la, atol=1e-5, rtol=1e-5)
