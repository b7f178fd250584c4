"""State-space layers (attention kind `ssm`, Mamba-2): the chunked scan and the one-token step equal
a hand-written sequential recurrence, causality, cached decoding equals recomputation, a hybrid
(attention + ssm) model trains, the preset's parameter count equals transformers' Mamba2ForCausalLM,
config errors, forge plan's count, and tp=2 == one process (slow; `forge train` at tp=2 and pp=2 of
tiny-mamba2 is in tests/test_parallel_layouts.py's LAYOUTS).
HF logit parity and the round trip are in tests/test_hf_parity.py (the mamba2 cases)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from forge.config import ConfigError, ModelConfig, load_config
from forge.models import build_model
from forge.models.layers.ssm import ssd_chunked, ssd_step
from forge.models.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")

SSM = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, ssm_state_size=8, ssm_head_dim=8,
           ssm_chunk_size=4)


def recurrence(x, dt, A, b, c, h0):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t b_t^T, y_t = h_t c_t, token by token, head by head
    (head i reads group i // (H / G) of b, c)."""
    Bsz, T, H, P = x.shape
    b, c = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (b, c))
    h, ys = h0.clone(), torch.zeros(Bsz, T, H, P, dtype=torch.float64)
    for t in range(T):
        for i in range(H):
            h[:, i] = torch.exp(dt[:, t, i] * A[i])[:, None, None] * h[:, i] + \
                dt[:, t, i][:, None, None] * x[:, t, i][:, :, None] * b[:, t, i][:, None, :]
            ys[:, t, i] = (h[:, i] * c[:, t, i][:, None, :]).sum(-1)
    return ys, h


def _inputs(T, H=6, P=4, N=5, G=2, seed=0):
    """Random scan inputs; b, c (B, T, G, N) shared by the H / G heads of each group."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, H, P, generator=g, dtype=torch.float64)
    b, c = (torch.randn(2, T, G, N, generator=g, dtype=torch.float64) for _ in range(2))
    dt = F.softplus(torch.randn(2, T, H, generator=g, dtype=torch.float64))
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 2 - 0.1
    h0 = torch.randn(2, H, P, N, generator=g, dtype=torch.float64)
    return x, dt, A, b, c, h0


@pytest.mark.parametrize("chunk", [1, 4, 7, 19, 32])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_scan_equals_sequential_recurrence(chunk, initial, groups):
    x, dt, A, b, c, h0 = _inputs(19, G=groups)
    h0 = h0 if initial else torch.zeros_like(h0)
    ref_y, ref_h = recurrence(x, dt, A, b, c, h0)
    y, h = ssd_chunked(x.float(), dt.float(), A.float(), b.float(), c.float(), chunk, h0.float() if initial else None)
    assert y.shape == ref_y.shape and h.shape == ref_h.shape
    torch.testing.assert_close(y.double(), ref_y, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(h.double(), ref_h, atol=2e-5, rtol=2e-5)


def test_scan_stays_fp32_under_autocast():
    x, dt, A, b, c, h0 = (t.float() for t in _inputs(19))
    ref, _ = ssd_chunked(x, dt, A, b, c, 8, h0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ssd_chunked(x, dt, A, b, c, 8, h0)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)


def test_recurrent_step_equals_recurrence():
    x, dt, A, b, c, h0 = _inputs(5, seed=1)
    ref_y, _ = recurrence(x, dt, A, b, c, h0)
    h = h0.float()
    for t in range(5):
        y, h = ssd_step(x[:, t].float(), dt[:, t].float(), A.float(), b[:, t].float(), c[:, t].float(), h)
        torch.testing.assert_close(y.double(), ref_y[:, t], atol=2e-5, rtol=2e-5)


def model_of(**kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**SSM, **kw})).eval()
    with torch.no_grad():              # larger weights than the default init: outputs that vary with the context
        for n, p in model.named_parameters():
            if p.dim() > 1 and "conv" not in n:
                p.normal_(0.0, 0.15)
    return model


KINDS = {"pure-g1": dict(attention="ssm", mlp="identity", norm_mlp="identity", position="none"),
         "hybrid-g2": dict(attention_pattern=["causal", "ssm"], ssm_n_groups=2)}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_changing_token_t_never_changes_outputs_before_t(name):
    model = model_of(**KINDS[name])
    ids = torch.randint(0, 61, (2, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids)
        for t in (0, 5, 13, 22):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 7) % 61
            out = model(changed)
            assert torch.equal(out[:, :t], ref[:, :t]), (name, t)
            assert not torch.allclose(out[:, t], ref[:, t]), (name, t)      # token t itself is seen


@pytest.mark.parametrize("name", sorted(KINDS))
def test_cached_decoding_through_generate_equals_recomputation(name):
    """forge.generate with the state cache (conv inputs + scan state; prompt of 9 > chunk 4, then one
    token at a time through the recurrent step) vs re-running the whole sequence each step."""
    from forge.generate import generate
    model = model_of(**KINDS[name])
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    cached = generate(model, ids, 20, temperature=0.0, use_cache=True)
    full = generate(model, ids, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)
    with torch.no_grad():           # and the logits of a cached prefill + steps vs one pass
        seq = cached
        cache = model.new_cache()
        parts = [model(seq[:, :9], cache=cache)] + [model(seq[:, t:t + 1], cache=cache) for t in range(9, 29)]
        assert cache.state[1] is not None and cache.length == 29
        torch.testing.assert_close(torch.cat(parts, dim=1), model(seq), atol=1e-5, rtol=1e-5)


def test_hybrid_model_trains():
    """causal + ssm layers: AdamW on one batch of repeated random sequences drives the loss down,
    and every ssm parameter gets a gradient."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**SSM, "attention_pattern": ["causal", "ssm"], "ssm_n_groups": 2}))
    ids = torch.randint(0, 61, (4, 8)).repeat(1, 4)                        # (4, 32): 8 tokens, 4 times
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        if step == 0:
            for n, p in model.layers["1"].attn.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("name", ["tiny-mamba2", "mamba2-130m"])
def test_parameter_count_equals_transformers_on_meta(name):
    transformers = pytest.importorskip("transformers")
    from forge.models.hf.mamba2 import mamba2_to_hf
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = build_model(cfg)
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**mamba2_to_hf(cfg)))
    theirs = sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
    assert ours.num_params() == theirs


def test_pure_mamba2_has_no_unused_parameters():
    """One norm per block and no MLP: the block holds exactly HF's tensors (norm + mixer)."""
    model = build_model(PRESETS["tiny-mamba2"], device="meta")
    names = {n.split(".", 2)[2] for n, _ in model.named_parameters() if n.startswith("layers.0.")}
    assert names == {"attn_norm.weight", "attn.dt_bias", "attn.A_log", "attn.D", "attn.norm.weight", "attn.wo.weight",
                     *(f"attn.{w}.weight" for w in ("in_z", "in_x", "in_b", "in_c", "in_dt")),
                     *(f"attn.conv_{w}.{s}" for w in "xbc" for s in ("weight", "bias"))}


def test_hybrid_has_no_hugging_face_family():
    from forge.models.hf.families import FAMILIES, representation_errors
    cfg = dataclasses.replace(PRESETS["tiny-mamba2"], attention="causal", attention_pattern=["ssm", "causal"],
                              position="rope", mlp="glu", norm_mlp=None, d_ff=64)
    assert all(representation_errors(spec, cfg) for spec in FAMILIES.values())
    assert not representation_errors(FAMILIES["Mamba2ForCausalLM"], PRESETS["tiny-mamba2"])


@pytest.mark.parametrize("overrides, message", [
    (["model.ssm_head_dim=12"], "model.ssm_head_dim=12 does not divide"),
    (["model.ssm_n_groups=3"], "model.ssm_n_groups=3 does not divide"),
    (["model.ssm_dt_min=0.5", "model.ssm_dt_max=0.1"], "model.ssm_dt_min=0.5"),
    (["model.ssm_state_size=0"], "model.ssm_state_size"),
    (["model.ssm_dt_clamp_max=0.0"], "model.ssm_dt_clamp_max"),
    (["model.quant.act_method=symmetric", "model.quant.act_points=[scores]"], "computes none"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, ["model.preset=tiny-mamba2", *overrides])


# ---------------------------------------------------------------- forge plan, tp=2 and pp=2
@pytest.fixture
def no_process_group():
    from forge.train.distributed import shutdown
    shutdown()


@pytest.mark.parametrize("overrides", [["parallel.tp=2", "parallel.pp=2"],
                                       ["model.attention_pattern=[causal,ssm]", "model.position=rope",
                                        "model.ssm_n_groups=2", "parallel.tp=2"]], ids=["pure-tp2-pp2", "hybrid-tp2"])
def test_plan_counts_the_ssm_tensors(no_process_group, overrides):
    from forge.plan import plan
    cfg = load_config(None, ["model.preset=tiny-mamba2", *overrides])
    with torch.device("meta"):
        expected = build_model(cfg.model).num_params()
    result = plan(cfg, cfg.parallel.tp * cfg.parallel.pp)
    assert result["params"] == expected
    assert sum(r["model_params"] for r in result["ranks"]) == expected


TP_CASES = {   # name -> (model overrides, sequence parallel)
    "g1-replicated-bc-shared-norm": (dict(attention="ssm", mlp="identity", norm_mlp="identity"), False),
    "g2-split-bc-sp": (dict(attention="ssm", ssm_n_groups=2, ssm_proj_bias=True), True),
    "g4-hybrid": (dict(attention_pattern=["ssm", "causal"], ssm_n_groups=4), False),
}


def _train_both(rank, world):
    """One process's model and its tp=2 shards from the same (layout-independent) initial weights,
    3 AdamW steps each on the same batches: losses within 1e-5 relative, final weights within 5e-5
    (tests.distributed.tp_training_matches); ssm heads, their groups and norm split over tp."""
    from forge.parallel.groups import build_groups
    from tests.distributed import tp_training_matches
    groups = build_groups(tp=world)
    for name, (kw, sp) in TP_CASES.items():
        # init_std 0.1: with 0.02 some wo gradient entries are ~1e-9, where Adam (eps 1e-6) turns the
        # fp32 roundoff of the tp reductions into a 1.3e-5 weight difference in 3 steps
        cfg = ModelConfig(**{**SSM, "vocab_size": 63, "init_std": 0.1, **kw})
        # weights within 5e-5: the scan's exp / cumsum chain differs from one process's by fp32 roundoff
        # (gradients within ~1e-6 relative), which Adam's normalised steps carry into small entries
        model = tp_training_matches(name, cfg, sp, groups, weight_tol=5e-5)
        mixer = model.layers["0"].attn                                  # layer 0 is ssm in every case
        heads = cfg.ssm_inner // cfg.ssm_head_dim
        assert mixer.A_log.shape == (heads // world,) and mixer.A_log.partition_dim == 0
        assert mixer.bc_replicated == (cfg.ssm_n_groups < world)


@pytest.mark.slow
def test_tensor_parallel_training_equals_one_process():
    from tests.distributed import run_distributed
    run_distributed(_train_both, 2)


def test_quantisation_reaches_the_ssm_projections():
    """model.quant's weight fake-quantisation applies to the mixer's projections: y = x q(W)^T."""
    from forge.parallel.quant import weight_quant
    cfg = load_config(None, ["model.preset=tiny-mamba2", "model.quant.weight_method=ternary"]).model
    mixer = build_model(cfg, seed=0).layers["0"].attn
    x = torch.randn(1, 5, cfg.d_model)
    for name in ("in_z", "in_x", "in_b", "in_c", "in_dt"):
        lin = getattr(mixer, name)
        q = weight_quant(cfg.quant)(lin.weight)
        assert not torch.equal(q, lin.weight)
        torch.testing.assert_close(lin(x), x @ q.t())
    assert mixer.wo.weight_quant is not None
