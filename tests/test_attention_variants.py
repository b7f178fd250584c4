"""Attention score functions (model.attention_softmax), qk_norm=l2_scale, qk/v head widths and
identity attention: closed forms on hand-made inputs, a naive dense reference written here (per
head, per query, with the mask), causality, exact masking under windows, GQA, KV-cache decoding
vs recomputation, config errors, forge plan's parameter count, and tp=2 == one process."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from forge.config import ConfigError, ModelConfig, load_config
from forge.models import build_model
from forge.models.layers.attention import AttnSpec, softmax_attention
from forge.models.layers.scores import SCORE
from tests.helpers import assert_cache_decoding_equals_recomputation, assert_causal

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes: see conftest.one_thread

NEW = sorted(k for k in SCORE if k != "softmax")
BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64)


# ---------------------------------------------------------------- the score functions themselves
def naive_weights(name, s, n, cfg, head):
    """Weights of one query over its n visible keys, s (n,) float64, straight from the formulas."""
    d = n if cfg.attention_divisor is None else cfg.attention_divisor
    if name == "softmax":
        e = torch.exp(s); return e / e.sum()
    if name == "softermax":
        e = 2.0 ** s; return e / e.sum()
    if name == "strongermax":
        e = cfg.strongermax_base ** (s / cfg.strongermax_temperature); return e / e.sum()
    if name == "consmax":
        return torch.exp(s - head["beta"]) / head["gamma"]
    if name == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-(s - math.log(n))))
    if name == "relumax":
        return s.clamp_min(0) / d
    if name == "relu2max":
        return s.clamp_min(0) ** 2 / d
    if name == "softplus":
        return torch.log1p(torch.exp(s)) / d
    if name == "squareplus":
        return (s + torch.sqrt(s ** 2 + cfg.squareplus_b)) / 2 / d
    if name == "polymax":
        x0, y0, m = cfg.polymax_x_intercept, cfg.polymax_y_intercept, cfg.polymax_power
        out = torch.zeros_like(s)
        lin = (s >= x0) & (s <= 0)
        out[lin] = y0 * (s[lin] - x0) / (0 - x0)
        out[s > 0] = s[s > 0] ** m + y0
        return out / d
    raise KeyError(name)


def visible(kind, i, j, window):
    if j > i:
        return False
    if kind == "sliding":
        return i - j < window
    if kind == "local":
        return i // window == j // window
    return True


def naive_attention(name, cfg, q, k, v, qpos, kpos, kind, window, scale, heads):
    """o_i = sum over visible j of p_ij v_j, per head h (kv head h // (H / Hkv)), in float64."""
    B, H, Tq, _ = q.shape
    rep = H // k.shape[1]
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for a in range(Tq):
                js = [j for j in range(k.shape[2]) if visible(kind, int(qpos[a]), int(kpos[j]), window)]
                s = torch.stack([q[b, h, a].double() @ k[b, h // rep, j].double() for j in js]) * scale
                p = naive_weights(name, s, len(js), cfg, heads[h])
                out[b, h, a] = sum(p[m] * v[b, h // rep, j].double() for m, j in enumerate(js))
    return out


def stub(name, cfg, kind, window, n_heads, chunk):
    """The kernel arguments of an Attention of this kind, window and score function."""
    score = None if name == "sdpa" else SCORE[name](cfg, n_heads)     # None: SDPA's softmax
    return AttnSpec(kind=kind, scale=0.7, score=score, chunk=chunk, sliding_window=window, local_window=window)


HAND = {  # one head, hd 1: q = (1, 2), k = (1, -1), scale 1 -> s_00 = 1; s_10 = 2, s_11 = -2; v = one-hot
    "softermax": ([1.0], [16 / 17, 1 / 17]),
    "strongermax": ([1.0], [3 ** 4 / (3 ** 4 + 3 ** -4), 3 ** -4 / (3 ** 4 + 3 ** -4)]),  # base 3, t 0.5
    "consmax": ([math.exp(1 - 0.5) / 4], [math.exp(2 - 0.5) / 4, math.exp(-2 - 0.5) / 4]),  # beta .5, gamma 4
    "sigmoid": ([1 / (1 + math.exp(-1))], [1 / (1 + math.exp(-(2 - math.log(2)))),
                                           1 / (1 + math.exp(-(-2 - math.log(2))))]),
    "relumax": ([1.0], [1.0, 0.0]),
    "relu2max": ([1.0], [2.0, 0.0]),
    "softplus": ([math.log(1 + math.e)], [math.log(1 + math.e ** 2) / 2, math.log(1 + math.e ** -2) / 2]),
    "squareplus": ([(1 + math.sqrt(1 + 4)) / 2], [(2 + math.sqrt(4 + 4)) / 4, (-2 + math.sqrt(4 + 4)) / 4]),  # b 4
    "polymax": ([(1 + 1)], [(4 + 1) / 2, 1 * (-2 + 10) / 10 / 2]),    # x0 -10, y0 1, power 2
}


@pytest.mark.parametrize("name", NEW)
def test_hand_made_closed_form(name):
    """T = 2, one head: the weights read off the output (v one-hot) equal the formulas by hand."""
    cfg = ModelConfig(strongermax_base=3.0, strongermax_temperature=0.5, consmax_beta=0.5, consmax_gamma=4.0,
                      consmax_per_head=False, squareplus_b=4.0, polymax_x_intercept=-10.0)
    attn = dataclasses.replace(stub(name, cfg, "causal", None, 1, 256), scale=1.0)
    q = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    k = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1)
    v = torch.eye(2).view(1, 1, 2, 2)          # v_hd 2 != qk hd 1
    pos = torch.arange(2)
    out = softmax_attention(q, k, v, pos, pos, attn)[0, 0]
    row0, row1 = HAND[name]
    torch.testing.assert_close(out, torch.tensor([row0 + [0.0], row1]), atol=1e-6, rtol=1e-6)


CASES = [  # (kind, window, n_heads, n_kv, chunk, query offset (a cache of that many keys))
    ("causal", None, 4, 2, 3, 0),          # GQA, three chunks
    ("sliding", 3, 4, 1, 2, 0),            # MQA
    ("local", 4, 2, 2, 256, 0),
    ("sliding", 3, 4, 2, 2, 5),            # decoding 4 queries after 5 cached keys
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-H{c[2]}kv{c[3]}-chunk{c[4]}-off{c[5]}")
@pytest.mark.parametrize("name", ["softmax"] + NEW)
def test_chunked_scores_equal_naive_dense_reference(name, case):
    """scored_attention (chunks, GQA, masks, cache offsets) == the per-query loop above; consmax with
    a different (beta, gamma) per head; 'softmax' runs the explicit path (SCORE's Softmax)."""
    kind, window, H, Hkv, chunk, off = case
    cfg = ModelConfig(attention_divisor=None if name != "relu2max" else 7.0, polymax_x_intercept=-2.0)
    attn = stub(name, cfg, kind, window, H, chunk)
    heads = [{} for _ in range(H)]
    if name == "consmax":
        with torch.no_grad():
            attn.score.beta.copy_(torch.linspace(-0.5, 1.0, H))
            attn.score.gamma.copy_(torch.linspace(0.5, 3.0, H))
        heads = [{"beta": float(b), "gamma": float(g)} for b, g in zip(attn.score.beta.tolist(), attn.score.gamma.tolist())]
    g = torch.Generator().manual_seed(0)
    Tq, hd, vd = 4 if off else 7, 5, 3
    q = torch.randn(2, H, Tq, hd, generator=g)
    k, v = torch.randn(2, Hkv, off + Tq, hd, generator=g), torch.randn(2, Hkv, off + Tq, vd, generator=g)
    qpos, kpos = torch.arange(off, off + Tq), torch.arange(off + Tq)
    out = softmax_attention(q, k, v, qpos, kpos, attn)
    ref = naive_attention(name, cfg, q, k, v, qpos, kpos, kind, window, attn.scale, heads)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5)


def test_explicit_softmax_equals_sdpa_and_checkpointed_chunks_give_the_same_gradients():
    """The chunked path with SCORE's softmax equals SDPA (values and gradients), and chunking with
    checkpoints changes neither the values nor the gradients of a score function with parameters."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 6, generator=g, requires_grad=True) for _ in range(3))
    pos = torch.arange(9)
    cfg = ModelConfig()

    def run(name, chunk):
        attn = stub(name, cfg, "sliding", 4, 4, chunk)
        if name == "consmax":
            with torch.no_grad():
                attn.score.beta.copy_(torch.linspace(-1, 1, 4))
        out = softmax_attention(q, k, v, pos, pos, attn)
        params = [] if attn.score is None else list(attn.score.parameters())
        grads = torch.autograd.grad((out * torch.cos(out)).sum(), [q, k, v, *params])
        return out, grads
    for a, b in (run("sdpa", 256), run("softmax", 2)), (run("consmax", 256), run("consmax", 2)):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
        for x, y in zip(a[1], b[1]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- whole models
VARIANTS = {**{name: dict(attention_softmax=name, attention_chunk=5) for name in NEW},
            "consmax-per-layer": dict(attention_softmax="consmax", consmax_per_head=False),
            "l2-scale": dict(qk_norm="l2_scale"),
            "l2-scale-sigmoid-gqa": dict(qk_norm="l2_scale", attention_softmax="sigmoid", n_kv_heads=2),
            "qk-v-widths": dict(qk_head_dim=12, v_head_dim=4, n_kv_heads=2),
            "widths-relumax-sliding": dict(qk_head_dim=6, v_head_dim=10, attention_softmax="relumax",
                                           attention="sliding", sliding_window=5),
            "identity-pattern": dict(attention_pattern=["identity", "causal"]),
            "squareplus-local-alibi": dict(attention_softmax="squareplus", attention="local", local_window=6,
                                           position="alibi", attention_chunk=4)}


def model_of(**kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():          # larger weights, and per-head parameters that differ by head
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.12)
            elif n.endswith("score.beta"):
                p.copy_(torch.linspace(-1.0, 1.0, p.numel()))
            elif n.endswith("score.gamma"):
                p.copy_(torch.linspace(0.5, 2.0, p.numel()))
    return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causal_changing_token_t_never_changes_logits_before_t(name):
    assert_causal(model_of(**VARIANTS[name]), seq_len=24, t=13)


@pytest.mark.parametrize("name", NEW)
def test_sliding_window_masks_exactly(name):
    """One layer, window 3, chunks of 4: logits at positions >= 3 are bit-identical whatever token 0 is."""
    model = model_of(attention_softmax=name, attention="sliding", sliding_window=3, n_layers=1, attention_chunk=4)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert torch.equal(a[:, 3:], b[:, 3:])
    assert (a[:, :3] - b[:, :3]).abs().max() > 1e-5


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cache_decoding_equals_recomputation(name):
    assert_cache_decoding_equals_recomputation(model_of(**VARIANTS[name]), new_tokens=10)


@pytest.mark.parametrize("kw", [dict(qk_norm="l2_scale", n_kv_heads=2, position="none"),
                                dict(qk_norm="l2_scale", qk_norm_scale=3.0, position="none"),
                                dict(qk_head_dim=12, v_head_dim=4, n_kv_heads=2, position="none")],
                         ids=["l2-scale-gqa", "l2-scale-init", "qk-v-widths-gqa"])
def test_attention_module_equals_dense_formula(kw):
    """One Attention against its formula from the raw weights: q = x Wq^T, k = x Wk^T, v = x Wv^T in
    heads of qk_head_dim / v_head_dim; l2_scale: s = g q/|q| . k/|k| with g = log2(L^2 - L) (or the configured
    value); else s = q . k / sqrt(qk_head_dim); causal softmax; heads concatenated (H * v_head_dim) -> wo."""
    cfg = ModelConfig(**{**BASE, **kw}).resolved()
    attn = model_of(**kw).layers["0"].attn
    H, Hkv, hd, vd, L = cfg.n_heads, cfg.n_kv_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.max_seq_len
    if cfg.qk_norm == "l2_scale":
        g0 = cfg.qk_norm_scale if cfg.qk_norm_scale is not None else math.log2(L * L - L)
        assert attn.qk_scale.weight.item() == pytest.approx(g0)
    assert attn.wo.weight.shape == (cfg.d_model, H * vd) and attn.wv.weight.shape == (Hkv * vd, cfg.d_model)
    x = torch.randn(2, 9, cfg.d_model, generator=torch.Generator().manual_seed(4))
    q = (x @ attn.wq.weight.T).view(2, 9, H, hd).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(2, 9, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    v = (x @ attn.wv.weight.T).view(2, 9, Hkv, vd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    if cfg.qk_norm == "l2_scale":
        s = attn.qk_scale.weight * (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2))
    else:
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    p = torch.softmax(s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")), -1)
    ref = (p @ v).transpose(1, 2).reshape(2, 9, H * vd) @ attn.wo.weight.T
    with torch.no_grad():
        torch.testing.assert_close(attn(x, torch.arange(9)), ref, atol=1e-5, rtol=1e-5)


def test_identity_attention_adds_nothing_and_holds_no_weights():
    model = model_of(attention_pattern=["identity", "causal"], norm="layernorm")
    b = model.layers["0"]
    assert not [n for n, _ in b.attn.named_parameters()] and list(model.layers["1"].attn.parameters())
    x, pos = torch.randn(2, 6, 32), torch.arange(6)
    with torch.no_grad():
        torch.testing.assert_close(b(x, pos), x + b.mlp(b.mlp_norm(x)))


@pytest.mark.parametrize("overrides, message", [
    (["model.attention=co4"], "sees future tokens"),
    (["model.attention_pattern=[causal,co4]"], "co4"),
    (["model.attention_softmax=fancymax"], "'consmax'"),
    (["model.qk_norm=l3"], "'l2_scale'"),
    (["model.attention=linear", "model.attention_softmax=relumax"], "model.attention_softmax"),
    (["model.qk_norm=l2_scale", "model.attn_scale=0.5"], "model.attn_scale"),
    (["model.qk_norm_scale=2.0"], "model.qk_norm_scale"),
    (["model.attention_chunk=0"], "model.attention_chunk"),
    (["model.polymax_x_intercept=1.0"], "model.polymax_x_intercept"),
    (["model.output_softmax=relumax"], "model.output_softmax='relumax' is not one of .'softermax', 'softmax'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ---------------------------------------------------------------- forge plan and tp=2
@pytest.fixture
def no_process_group():
    from forge.train.distributed import shutdown
    shutdown()


PLAN_CASES = [["model.attention_softmax=consmax", "model.n_kv_heads=2", "parallel.tp=2"],
              ["model.attention_softmax=consmax", "model.consmax_per_head=false", "model.qk_norm=l2_scale",
               "model.qk_head_dim=12", "model.v_head_dim=4", "model.attention_pattern=[causal,identity]",
               "parallel.tp=2", "parallel.pp=2"]]


@pytest.mark.parametrize("overrides", PLAN_CASES, ids=["consmax-per-head-tp2", "per-layer-l2-widths-identity-tp2-pp2"])
def test_plan_counts_the_new_parameters(no_process_group, overrides):
    from forge.plan import plan
    from forge.models.transformer import Transformer
    cfg = load_config(None, ["model.preset=tiny-llama", *overrides])
    with torch.device("meta"):
        one = Transformer(cfg.model)
    expected = one.num_params()
    heads = cfg.model.n_heads if cfg.model.consmax_per_head else 1
    L = sum(cfg.model.layer_attention(i) != "identity" for i in range(cfg.model.n_layers))   # layers with attention
    extra = 2 * heads * L + (L if cfg.model.qk_norm == "l2_scale" else 0)
    assert sum(p.numel() for n, p in one.named_parameters() if "score" in n or "qk_scale" in n) == extra
    world = cfg.parallel.tp * cfg.parallel.pp
    result = plan(cfg, world)
    assert result["params"] == expected
    assert sum(r["model_params"] for r in result["ranks"]) == expected


TP_CASES = {  # name -> (model overrides, sequence parallel); every kind of issue 15 items 3, 4, 7
    **{name: (dict(attention_softmax=name, attention_chunk=6), False) for name in NEW},
    "consmax-per-layer-sp": (dict(attention_softmax="consmax", consmax_per_head=False), True),
    "l2-scale-mqa": (dict(qk_norm="l2_scale", n_kv_heads=1), False),            # kv heads replicated over tp
    "widths-sliding-sigmoid-sp": (dict(qk_head_dim=6, v_head_dim=10, attention="sliding", sliding_window=5,
                                       attention_softmax="sigmoid", n_kv_heads=2), True),
    "identity-pattern": (dict(attention_pattern=["identity", "causal"]), False),
    # issue 15 item 2: per-head sinks split with the heads, GQA, sliding + causal layers, yarn
    "sinks-gqa-sliding-yarn-sp": (dict(attention_sinks=True, n_kv_heads=2, attention_pattern=["sliding", "causal"],
                                       sliding_window=5, attention_chunk=6, rope_scaling="yarn",
                                       rope_scaling_factor=4.0, rope_original_max_seq_len=8), True),
}


def _train_both(rank, world):
    """For each case: one process's model and its tp=2 shards from the same weights, 3 AdamW steps
    each on the same batches; losses within 1e-5 relative at every step, final weights within 1e-5
    (tests.distributed.tp_training_matches); per-head parameters split with the heads."""
    from forge.parallel.groups import build_groups
    from tests.distributed import tp_training_matches
    groups = build_groups(tp=world)
    for name, (kw, sp) in TP_CASES.items():
        cfg = ModelConfig(**{**BASE, "vocab_size": 63, **kw})                  # padded to 64 under tp=2
        model = tp_training_matches(name, cfg, sp, groups)
        if kw.get("attention_softmax") == "consmax" and kw.get("consmax_per_head", True):
            beta = model.layers["0"].attn.score.beta
            assert beta.shape == (cfg.n_heads // world,) and beta.partition_dim == 0
        if kw.get("attention_sinks"):
            sinks = model.layers["0"].attn.sinks.weight
            assert sinks.shape == (cfg.n_heads // world,) and sinks.partition_dim == 0


@pytest.mark.slow
def test_tensor_parallel_training_equals_one_process():
    from tests.distributed import run_distributed
    run_distributed(_train_both, 2)


FORGE_TRAIN_KINDS = ["model.n_layers=3", "model.attention_pattern=[causal,identity,sliding]", "model.sliding_window=8",
                     "model.attention_softmax=consmax", "model.qk_norm=l2_scale", "model.qk_head_dim=8",
                     "model.qk_norm_scale=3.0", "model.v_head_dim=24", "model.attention_chunk=8"]


@pytest.mark.slow
def test_forge_train_tp2_equals_one_process(tmp_path_factory):
    """`forge train` (DeepSpeed, grad clipping by the global norm, a sharded checkpoint at the end)
    at tp=2 vs one process, with per-head consmax parameters, l2_scale, qk/v widths, identity and
    sliding layers and checkpointed score chunks (32 tokens, chunks of 8): losses within 1e-5
    relative at every step and the checkpointed weights (read back from the per-rank files)
    within 1e-5. g starts at 3, not log2(L^2 - L) ~ 10: with consmax's unnormalised e^(s - beta)
    that sharp start amplifies fp32 roundoff to ~1.6e-5 in 4 Adam steps (each alone: < 2e-6)."""
    from tests.helpers import assert_same_training, built_data
    from tests.test_parallel_layouts import STEPS, job, run
    d = built_data(str(tmp_path_factory.mktemp("data")))
    results = []
    for world, parallel in ((1, {}), (2, dict(tp=2))):
        out = str(tmp_path_factory.mktemp(f"train-tp{world}"))
        results.append(run(job(out, d, "tiny-llama", 1, **parallel) + FORGE_TRAIN_KINDS, world))
    (ref_losses, ref_weights, _), (losses, weights, _) = results
    assert len(losses) == STEPS
    assert weights["layers.0.attn.score.beta"].shape == (4,)          # whole again: both ranks' heads
    assert_same_training(losses, weights, ref_losses, ref_weights)


def test_plan_keeps_the_score_term_only_for_one_unchunked_explicit_chunk():
    """forge plan's activations: a non-softmax score function stores s x s scores (5as/h) only when
    one chunk holds the whole sequence; longer sequences recompute chunk by chunk (no term)."""
    from forge.plan import _activation_terms
    base = ["model.preset=tiny-llama", "data.seq_len=64", "model.attention_softmax=relumax"]
    one, _, txt_one = _activation_terms(load_config(None, base + ["model.attention_chunk=64"]))
    chunked, _, txt = _activation_terms(load_config(None, base + ["model.attention_chunk=16"]))
    softmax, _, _ = _activation_terms(load_config(None, ["model.preset=tiny-llama", "data.seq_len=64"]))
    cfg = load_config(None, base)
    s, b, h, a = 64, cfg.train.micro_batch_size, cfg.model.d_model, cfg.model.n_heads
    assert chunked == softmax and "+ 5as" not in txt
    assert one - chunked == 2 * s * b * h * 5 * a * s / h and "+ 5as" in txt_one   # fp32: twice the bytes


@pytest.mark.parametrize("kw", [dict(output_softmax="softermax"),
                                dict(output_softmax="strongermax", strongermax_base=5.0, strongermax_temperature=0.7)],
                         ids=["softermax", "strongermax"])
def test_output_softmax_loss_and_sampling_use_the_variant(kw):
    """With the same weights as a softmax model whose logits are z: the loss is -log(b^(z_y/t) /
    sum b^(z/t)) and the distribution sampled from is b^(z/t) / sum b^(z/t) (base 2, t 1 for
    softermax); greedy decoding is unchanged (the map is monotone)."""
    from forge.generate import generate
    base, t = (2.0, 1.0) if kw["output_softmax"] == "softermax" else (5.0, 0.7)
    plain, variant = model_of(), model_of(**kw)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        z = plain(ids[:, :-1]).double()
        p = base ** (z / t) / (base ** (z / t)).sum(-1, keepdim=True)
        nll = -torch.log(p.gather(-1, ids[:, 1:, None])).mean()
        logits = variant(ids[:, :-1])
        torch.testing.assert_close(variant.loss(logits, ids[:, 1:]).double(), nll, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.softmax(logits.double(), -1), p, atol=1e-6, rtol=1e-5)
    assert torch.equal(generate(variant, ids[:, :4], 6, temperature=0.0), generate(plain, ids[:, :4], 6, temperature=0.0))


@pytest.mark.parametrize("kw", [dict(attention_softmax="consmax"), dict(qk_norm="l2_scale"), dict(v_head_dim=8),
                                dict(output_softmax="softermax"), dict(attention_pattern=["identity", "causal"])],
                         ids=["consmax", "l2-scale", "v-width", "output-softermax", "identity"])
def test_hugging_face_export_refuses_the_new_kinds(kw):
    """No Llama-family counterpart: conversion names the field instead of writing a wrong model."""
    import dataclasses
    from forge.models.hf.families import FAMILIES, representation_errors
    from forge.models.presets import PRESETS
    errs = representation_errors(FAMILIES["LlamaForCausalLM"], dataclasses.replace(PRESETS["tiny-llama"], **kw))
    assert errs and any(k in errs[0] for k in (*kw, "layer_kinds"))
