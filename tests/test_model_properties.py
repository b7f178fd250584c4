"""Defining properties of the variants that have no Hugging Face counterpart (and of the
decoder in general): causality, receptive fields, closed forms, wiring formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from forge.config import ModelConfig
from forge.models import build_model
from forge.models.layers.norm import RMSNorm, ScaleNorm
from forge.models.layers.position import alibi_slopes

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64)
VARIANTS = {
    "rope-causal": dict(),
    "gqa-mqa": dict(n_kv_heads=1),
    "alibi": dict(position="alibi"),
    "sinusoidal": dict(position="sinusoidal"),
    "learned": dict(position="learned"),
    "nopos": dict(position="none"),
    "linear": dict(attention="linear"),
    "sliding": dict(attention="sliding", sliding_window=4),
    "local": dict(attention="local", local_window=8),
    "pattern": dict(attention_pattern=["sliding", "causal"], sliding_window=4, attn_softcap=20.0),
    "scalenorm-peri": dict(norm="scalenorm", block="peri_ln"),
    "post-ln": dict(norm="layernorm", block="post_ln", mlp="mlp", activation="relu2"),
    "parallel": dict(block="parallel", rotary_pct=0.5, rope_interleaved=True),
    "norm-after-qknorm": dict(block="norm_after", qk_norm="full"),
    "softcap-head": dict(logit_softcap=5.0, embed_scale=2.0, tie_embeddings=True),
}


def model_of(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **kw})).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causal_changing_token_t_never_changes_logits_before_t(name):
    model = model_of(**VARIANTS[name])
    ids = torch.randint(0, 64, (2, 24))
    t = 13
    other = ids.clone()
    other[:, t] = (ids[:, t] + 1) % 64
    a, b = model(ids), model(other)
    assert torch.equal(a[:, :t], b[:, :t]) or (a[:, :t] - b[:, :t]).abs().max() < 1e-6
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4     # and it does change what follows


def test_linear_attention_equals_its_quadratic_form():
    from forge.models.layers.attention import linear_attention
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 150, 8                       # T spans several chunks of 64
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    pos = torch.arange(T)
    out = linear_attention(q, k, v, pos, pos)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1            # phi(x) = elu(x) + 1
    a = (fq @ fk.transpose(-1, -2)) * torch.ones(T, T).tril()
    ref = (a @ v) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _influence(model, ids, src):
    """Positions whose logits change when token `src` changes."""
    other = ids.clone()
    other[:, src] = (ids[:, src] + 1) % 64
    return ((model(ids) - model(other)).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()


def test_sliding_window_receptive_field():
    # Each layer sees i - j < W; L layers reach back L * (W - 1) positions.
    W, L = 4, 2
    model = model_of(attention="sliding", sliding_window=W, n_layers=L)
    ids = torch.randint(0, 64, (1, 20))
    assert _influence(model, ids, 0) == list(range(0, L * (W - 1) + 1))


def test_local_window_blocks_do_not_see_each_other():
    model = model_of(attention="local", local_window=8, position="learned")
    ids = torch.randint(0, 64, (1, 24))
    assert _influence(model, ids, 3) == list(range(3, 8))
    assert _influence(model, ids, 9) == list(range(9, 16))


def test_alibi_slopes_and_translation_invariance():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads (Press et al.)
    assert torch.allclose(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    model = model_of(position="alibi")               # relative positions only: a shift changes nothing
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(ids), model(ids, pos_offset=7), atol=1e-5, rtol=1e-5)


def test_sinusoidal_table_matches_formula():
    model = model_of(position="sinusoidal")
    pe, d = model.embed.pos.pe, BASE["d_model"]
    for t, i in [(0, 0), (5, 3), (40, 15)]:
        assert pe[t, 2 * i].item() == pytest.approx(math.sin(t / 10000 ** (2 * i / d)), abs=1e-5)
        assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(t / 10000 ** (2 * i / d)), abs=1e-5)


def test_scalenorm_and_offset_rmsnorm_formulas():
    x = torch.randn(3, 5, 16) * 7
    sn = ScaleNorm(16)
    with torch.no_grad():
        sn.weight.fill_(2.5)
    assert torch.allclose(sn(x).norm(dim=-1), torch.full((3, 5), 2.5), atol=1e-5)
    assert torch.allclose(sn(x), sn(3 * x), atol=1e-6)                 # scale invariant
    rms = RMSNorm(16, eps=0.0, offset=1.0)
    with torch.no_grad():
        rms.weight.uniform_(-0.5, 0.5)
    ref = x / x.pow(2).mean(-1, keepdim=True).sqrt() * (1.0 + rms.weight)
    torch.testing.assert_close(rms(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", ["pre_ln", "post_ln", "peri_ln", "norm_after", "parallel", "parallel2"])
def test_block_wiring_formulas(block):
    kw = dict(block="parallel", parallel_shared_norm=False) if block == "parallel2" else dict(block=block)
    model = model_of(norm="layernorm", **kw)
    b = model.layers["0"]
    with torch.no_grad():            # distinct, non-trivial norm parameters so a swap is caught
        for n in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm"):
            if getattr(b, n) is not None:
                getattr(b, n).weight.uniform_(0.5, 1.5)
                getattr(b, n).bias.uniform_(-0.5, 0.5)
    x, pos = torch.randn(2, 10, 32), torch.arange(10)
    A, M = (lambda h: b.attn(h, pos)), b.mlp
    if block == "pre_ln":
        h = x + A(b.attn_norm(x)); ref = h + M(b.mlp_norm(h))
    elif block == "post_ln":
        h = b.post_attn_norm(x + A(x)); ref = b.post_mlp_norm(h + M(h))
    elif block == "peri_ln":
        h = x + b.post_attn_norm(A(b.attn_norm(x))); ref = h + b.post_mlp_norm(M(b.mlp_norm(h)))
    elif block == "norm_after":
        h = x + b.post_attn_norm(A(x)); ref = h + b.post_mlp_norm(M(h))
    elif block == "parallel":
        assert b.mlp_norm is None
        ref = x + A(b.attn_norm(x)) + M(b.attn_norm(x))
    else:
        ref = x + A(b.attn_norm(x)) + M(b.mlp_norm(x))
    torch.testing.assert_close(b(x, pos), ref)


def test_qk_norm_head_vs_full_shapes():
    head = model_of(qk_norm="head").layers["0"].attn
    full = model_of(qk_norm="full").layers["0"].attn
    assert head.q_norm.weight.shape == (8,) and full.q_norm.weight.shape == (32,)


def test_activation_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 64, (2, 17))
    grads = {}
    for mode in ("none", "full", "attention"):
        model = model_of().train()
        model.set_activation_checkpointing(mode)
        model.loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for mode in ("full", "attention"):
        for g0, g1 in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(g0, g1)
