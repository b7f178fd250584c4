"""Embedding variants: factorised tables (model.n_embd_wte, tied down-projection), a learned
embedding scale, the embedding initialisations (each by its defining property, and the same
table under any tp layout), the residual multiplier and logit divisor (Granite's scalars) by
closed forms, config errors; and (slow) a short tp=2 training run equal to one process."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from forge.config import ConfigError, ModelConfig
from forge.models import build_model
from forge.models.init import EMBED_INIT, WeightInit
from forge.parallel.context import ParallelContext

BASE = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=64)


def table(seed=3, **kw):
    """The initial token table of a one-process model."""
    return build_model(ModelConfig(**{**BASE, **kw}), seed=seed).embed.tok.weight.detach()


def test_hypercube_rows_are_plus_minus_c():
    w = table(embed_init="hypercube", embed_init_scale=0.25)
    assert set(w.unique().tolist()) == {-0.25, 0.25}
    assert w.shape == (96, 32)
    assert 0.4 < (w > 0).float().mean() < 0.6           # both signs, about half each


def test_onehot_rows_are_distinct_basis_vectors():
    w = table(embed_init="onehot", embed_init_scale=0.5, vocab_size=24)
    assert torch.equal(w, 0.5 * torch.eye(24, 32))


def test_onehot_needs_vocab_at_most_width():
    with pytest.raises(ConfigError, match="model.embed_init='onehot'.*vocab_size=96 <= the table width 32"):
        ModelConfig(**BASE, embed_init="onehot").validate()
    # factorised: the table's width is n_embd_wte
    with pytest.raises(ConfigError, match="width 16"):
        ModelConfig(**{**BASE, "vocab_size": 24}, n_embd_wte=16, embed_init="onehot").validate()


@pytest.mark.parametrize("width", [8, 24], ids=["enumerated", "redrawn"])
def test_unique_hypercube_rows_distinct_and_not_opposite(width):
    vocab = 100 if width == 8 else 500                     # 100 of the 2^7 = 128 classes {v, -v}
    w = table(embed_init="unique_hypercube", embed_init_scale=0.1, n_embd_wte=width, vocab_size=vocab)
    assert torch.equal(w.abs(), torch.full_like(w, 0.1))
    canon = w * w[:, :1].sign()                            # one representative of {v, -v}
    assert torch.unique(canon, dim=0).shape[0] == vocab
    # not all rows start with the same sign: the classes' representatives are randomly signed
    assert 0 < (w[:, 0] > 0).sum() < vocab


def test_unique_hypercube_needs_enough_corners():
    with pytest.raises(ConfigError, match="unique_hypercube.*vocab_size=200 <= 2\\^\\(width-1\\) = 128"):
        ModelConfig(**{**BASE, "vocab_size": 200}, n_embd_wte=8, embed_init="unique_hypercube").validate()


def test_angle_hypersphere_rows_on_sphere_nearly_orthogonal():
    E = 256
    w = table(embed_init="angle_hypersphere", embed_init_scale=2.0, vocab_size=400, d_model=512, n_embd_wte=E)
    torch.testing.assert_close(w.norm(dim=1), torch.full((400,), 2.0), atol=1e-5, rtol=0)
    cos = (w @ w.t() / 4.0)[~torch.eye(400, dtype=torch.bool)]   # cosines of distinct rows
    # cos(theta) coordinates, theta ~ U[0, 2 pi): the cosine of two rows has mean 0, sd 1/sqrt(E)
    assert abs(cos.mean().item()) < 4 / math.sqrt(E) / math.sqrt(400)
    assert abs(cos.std().item() * math.sqrt(E) - 1.0) < 0.05
    assert (w.abs() <= 2.0).all()


def test_gaussian_mean_and_std():
    w = table(vocab_size=400, d_model=128, embed_init_mean=0.3, init_std=0.05)
    assert abs(w.mean().item() - 0.3) < 0.002 and abs(w.std().item() - 0.05) < 0.002


def test_unknown_embed_init_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"model.embed_init='uniform' is not one of \['angle_hypersphere'"):
        ModelConfig(**BASE, embed_init="uniform").validate()


@pytest.mark.parametrize("kind", sorted(EMBED_INIT))
def test_every_init_is_layout_independent(kind):
    """tp rank r's shard of the table (tp=2, 95 rows padded to 96) is rows r*48.. of the one-process
    table, padding rows zero: the table is drawn at full shape from the tensor's own seed, then cut."""
    kw = dict(BASE, vocab_size=95, embed_init=kind, embed_init_scale=0.5)
    if kind == "onehot":
        kw.update(vocab_size=23, d_model=32)
    cfg = ModelConfig(**kw).validate()
    full = build_model(cfg, seed=11).embed.tok.weight.detach()
    V = cfg.vocab_size
    local = (V + 1) // 2
    parts = []
    for rank in range(2):
        init = WeightInit(cfg, 11)
        init.tp, init.tp_rank = 2, rank
        p = torch.empty(local, 32)
        p.partition_dim = 0
        init(None, "weight", "embed.tok.weight", p)
        parts.append(p)
    shard = torch.cat(parts)
    assert torch.equal(shard[:V], full) and torch.equal(shard[V:], torch.zeros(2 * local - V, 32))


# ---------------------------------------------------------------- factorised embeddings
def _norm_out(model, ids):
    """The final norm's output for ids (hook), and the logits."""
    seen = {}
    h = model.norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    logits = model(ids)
    h.remove()
    return seen["x"], logits


@pytest.mark.parametrize("tie_proj", [False, True], ids=["own-down", "tied-down"])
def test_factorised_tied_head_closed_form(tie_proj):
    cfg = ModelConfig(**BASE, n_embd_wte=8, tie_embeddings=True, tie_embed_proj=tie_proj, embed_scale=1.5)
    model = build_model(cfg, seed=5)
    names = dict(model.named_parameters())
    assert names["embed.tok.weight"].shape == (96, 8) and names["embed.up.weight"].shape == (32, 8)
    assert ("head.down.weight" in names) == (not tie_proj)
    assert model.head.proj.weight is model.embed.tok.weight
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    E, U = model.embed.tok.weight, model.embed.up.weight
    Dn = U.t() if tie_proj else model.head.down.weight
    with torch.no_grad():
        x, logits = _norm_out(model, ids)
        torch.testing.assert_close(model.embed(ids, torch.arange(7)), 1.5 * E[ids] @ U.t())
        torch.testing.assert_close(logits, x @ Dn.t() @ E.t(), atol=1e-6, rtol=1e-5)
    # parameter count: 96*8 table + 32*8 up (+ 8*32 down) instead of a 96*32 table
    dense = build_model(dataclasses.replace(cfg, n_embd_wte=None, tie_embed_proj=False), device="meta").num_params()
    assert model.num_params() == dense - 96 * 32 + 96 * 8 + 32 * 8 + (0 if tie_proj else 8 * 32)


def test_factorised_untied_head_is_full_width():
    model = build_model(ModelConfig(**BASE, n_embd_wte=8), device="meta")
    assert model.head.proj.weight.shape == (96, 32) and model.head.down is None


def test_factorised_config_errors():
    with pytest.raises(ConfigError, match=r"model.n_embd_wte=32 must be in \[1, model.d_model=32\)"):
        ModelConfig(**BASE, n_embd_wte=32).validate()
    with pytest.raises(ConfigError, match="model.tie_embed_proj=true needs"):
        ModelConfig(**BASE, n_embd_wte=8, tie_embed_proj=True).validate()


def test_factorised_model_has_no_hf_family():
    from forge.models.hf import UnsupportedModelError
    from forge.models.hf.convert import pick_family
    with pytest.raises(UnsupportedModelError, match="n_embd_wte"):
        pick_family(ModelConfig(**BASE, n_embd_wte=8).validate())


# ---------------------------------------------------------------- scalars
def test_learned_scale_starts_at_embed_scale_and_learns():
    cfg = ModelConfig(**BASE, embed_scale=2.5)
    fixed = build_model(cfg, seed=7)
    learned = build_model(dataclasses.replace(cfg, embed_scale_learned=True), seed=7)
    assert learned.embed.scale_param.item() == 2.5 and learned.embed.scale_param.shape == (1,)
    assert learned.num_params() == fixed.num_params() + 1
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = fixed(ids)
    out = learned(ids)
    assert torch.equal(out, ref)                       # same weights (per-name seeds), same function
    learned.loss(out[:, :-1], ids[:, 1:]).backward()
    assert learned.embed.scale_param.grad.abs() > 0


def test_residual_multiplier_zero_makes_blocks_identity():
    cfg = ModelConfig(**BASE, residual_multiplier=0.0)
    model = build_model(cfg, seed=2)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.head(model.norm(model.embed(ids, torch.arange(9))))
        assert torch.equal(model(ids), ref)


def test_residual_multiplier_scales_each_branch():
    """pre_ln block with multiplier m: h = x + m A(N_a(x)), y = h + m M(N_m(h))."""
    cfg = ModelConfig(**BASE, residual_multiplier=0.3)
    block = build_model(cfg, seed=2).layers["0"]
    x, pos = torch.randn(2, 5, 32), torch.arange(5)
    with torch.no_grad():
        h = x + 0.3 * block.attn(block.attn_norm(x), pos)
        torch.testing.assert_close(block(x, pos), h + 0.3 * block.mlp(block.mlp_norm(h)))


def test_logit_divisor_divides_logits():
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = build_model(ModelConfig(**BASE), seed=4)(ids)
    out = build_model(ModelConfig(**BASE, logit_divisor=8.0), seed=4)(ids)
    torch.testing.assert_close(out, ref / 8.0, atol=0, rtol=1e-6)
    assert torch.isfinite(F.log_softmax(out, -1)).all()


# ---------------------------------------------------------------- tp = 2 trains like one process
EMBED_OVERRIDES = ["model.n_embd_wte=32", "model.tie_embeddings=true", "model.embed_scale_learned=true",
                   "model.embed_scale=2.0", "model.embed_init=unique_hypercube", "model.embed_init_scale=0.05",
                   "model.residual_multiplier=0.5", "model.logit_divisor=2.0"]


@pytest.mark.slow
def test_factorised_learned_scale_tp2_pp2_train_like_one_process(tmp_path_factory):
    """tp=2, tp=2 with sequence parallelism, and pp=2 (the head's down-projection in its own
    pipeline layer, the table tied across stages): the same losses and final weights as one process."""
    from tests.test_parallel_layouts import LR, STEPS, cache_dir, job, run
    d = cache_dir.__wrapped__(tmp_path_factory)          # the shards, built once
    ref_losses, ref_weights, _ = run(job(str(tmp_path_factory.mktemp("ref")), d, "tiny-llama", 1)
                                     + EMBED_OVERRIDES, 1)
    for sp, parallel in (("tp2", dict(tp=2)), ("tp2-sp", dict(tp=2, sequence_parallel="true")),
                         ("pp2", dict(pp=2))):
        losses, weights, _ = run(job(str(tmp_path_factory.mktemp(sp)), d, "tiny-llama", 1, **parallel)
                                 + EMBED_OVERRIDES, 2)
        assert len(losses) == STEPS
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (sp, losses, ref_losses)
        assert weights.keys() == ref_weights.keys()
        assert {"embed.up.weight", "embed.scale_param", "head.down.weight"} <= weights.keys()
        assert ref_weights["embed.scale_param"].item() != 2.0          # it learned
        for name, ref in ref_weights.items():
            err = (weights[name] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err <= 1e-5 or (name.endswith("attn.wk.bias") and (weights[name] - ref).abs().max()
                                   <= 2 * STEPS * LR), f"{sp} {name}: relative difference {err:.2e}"


@pytest.mark.parametrize("factorised", [{}, {"n_embd_wte": 16}, {"n_embd_wte": 16, "tie_embed_proj": True}],
                         ids=["granite", "factorised-own-down", "factorised-tied-down"])
def test_pipeline_layers_apply_granite_scalars(factorised):
    """The pipeline's layer list (EmbedPipe, BlockPipe x L, NormPipe, [HeadDownPipe,] tied head),
    run in order in one process with the Transformer's weights, gives the Transformer's logits: the
    embedding scale, residual multiplier, attention scale and logit divisor are all applied on the
    pipeline path, and a factorised tied head's down-projection (own, or the up-projection's
    transpose) too. Every pipeline parameter is one of the Transformer's."""
    from forge.layout.pipeline import forge_name, pipeline_specs
    from forge.models.presets import PRESETS
    cfg = dataclasses.replace(PRESETS["tiny-granite"], **factorised)
    assert (cfg.embed_scale, cfg.residual_multiplier, cfg.logit_divisor) == (12.0, 0.22, 8.0)
    model = build_model(cfg, seed=9)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    specs = pipeline_specs(cfg)
    layers = [s.build() for s in specs]
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for n, p in layer.named_parameters():
                p.copy_(sd[forge_name(f"{i}.{n}", cfg.n_layers)])
        x = ids
        for spec, layer in zip(specs, layers):
            fn = getattr(spec, "forward_fn", None)
            x = fn(layer, x) if fn is not None else layer(x)
        torch.testing.assert_close(x, model(ids), atol=1e-6, rtol=1e-6)
