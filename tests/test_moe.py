"""Mixture of experts, one process: the layer against a per-token reference for every router /
expert / shared-expert variant, router properties, the auxiliary losses (values, and that their
gradient reaches the router without the trainer adding them, across a pipeline cut), the
aux-loss-free bias, capacity dropping on a crafted routing, metrics and config errors."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from forge.config import ConfigError, ModelConfig, MoEConfig, load_config
from forge.models import build_model
from forge.models.layers.mlp import ACTIVATION
from forge.models.layers.moe import MoE, is_moe_layer, moe_metrics, set_aux_loss_scale, update_moe_biases
from forge.models.layers.moe_router import load_balancing_loss


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes: see conftest.one_thread

D, E = 32, 4


def make_cfg(**moe):
    base = dict(n_experts=E, top_k=2)
    mlp = moe.pop("mlp", "glu")
    bias = moe.pop("mlp_bias", False)
    return ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, mlp=mlp,
                       mlp_bias=bias, activation="gelu" if mlp == "mlp" else "silu",
                       moe=MoEConfig(**{**base, **moe})).validate()


def make_moe(seed=0, **moe):
    cfg = make_cfg(**moe)
    torch.manual_seed(seed)
    m = MoE(cfg.resolved())
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m, cfg


def reference(m: MoE, cfg, x):
    """Per token: y = sum_{e in chosen} w_e E_e(x) + gate * S(x), written out with plain loops."""
    moe, act = cfg.moe, ACTIVATION[cfg.activation]()
    ex = m.experts
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            logits = m.router.weight @ v
            s = logits.softmax(-1) if moe.router == "softmax" else logits.sigmoid()
            sel = s + (m.router.expert_bias if m.router.expert_bias is not None else 0)
            idx = sel.topk(moe.top_k).indices
            w = s[idx] / (s[idx].sum() if moe.renormalize else 1)
            for e, we in zip(idx.tolist(), w):
                def lin(mod):
                    return mod.weight[e] @ v + (mod.bias[e] if mod.bias is not None else 0)
                h = act(lin(ex.w_gate)) * lin(ex.w_up) if cfg.mlp == "glu" else act(lin(ex.w_in))
                o = ex.w_out.weight[e] @ h + (ex.w_out.bias[e] if ex.w_out.bias is not None else 0)
                out[b, t] += we * o
    if m.shared is not None:
        s = m.shared(x)
        if m.shared_gate is not None:
            s = torch.sigmoid(x @ m.shared_gate.weight.T) * s
        out = out + s
    return out


VARIANTS = {
    "softmax-renorm-glu": dict(),
    "softmax-no-renorm": dict(renormalize=False),
    "sigmoid-top3-shared-deepseek": dict(router="sigmoid", top_k=3, n_shared_experts=2, shared_d_ff=16),
    "mlp-kind-with-biases": dict(mlp="mlp", mlp_bias=True),
    "qwen2-gated-shared": dict(renormalize=False, n_shared_experts=1, shared_d_ff=40, shared_gate=True, d_ff=24),
    "top1-with-bias-buffer": dict(top_k=1, bias_update_rate=0.1),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_layer_matches_per_token_reference(name):
    m, cfg = make_moe(**VARIANTS[name])
    if m.router.expert_bias is not None:
        m.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference(m, cfg, x), atol=1e-5, rtol=1e-5)


def test_moe_layer_placement():
    cfg = dataclasses.replace(make_cfg(every=2, first_dense=1), n_layers=6)
    model = build_model(cfg)
    kinds = [type(layer.mlp).__name__ for layer in model.layers.values()]
    assert kinds == ["GLU", "MoE", "GLU", "MoE", "GLU", "MoE"]
    assert [is_moe_layer(cfg, i) for i in range(6)] == [k == "MoE" for k in kinds]


# ---------------------------------------------------------------- router
def test_router_weights():
    x = torch.randn(50, D)
    for router in ("softmax", "sigmoid"):
        m, _ = make_moe(router=router, top_k=2)
        logits, scores, idx, w = m.router(x)
        assert logits.dtype == torch.float32 and idx.shape == (50, 2)
        torch.testing.assert_close(w.sum(-1), torch.ones(50))                      # renormalised
        m2, _ = make_moe(router=router, top_k=2, renormalize=False)
        _, s2, idx2, w2 = m2.router(x)
        expect = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
        torch.testing.assert_close(s2, expect)
        torch.testing.assert_close(w2, expect.gather(-1, idx2))                     # raw top-k scores
        assert torch.equal(idx2, expect.topk(2).indices)


def test_router_in_fp32_under_bf16():
    m, _ = make_moe(bias_update_rate=1e-3)
    m.router.expert_bias.fill_(0.1001)
    m = m.to(torch.bfloat16)
    assert m.router.expert_bias.dtype == m.router.load.dtype == torch.float32     # kept exact
    assert m.router.expert_bias[0].item() == pytest.approx(0.1001, abs=1e-7)
    assert m.router.weight.dtype == torch.bfloat16
    logits, scores, _, w = m.router(torch.randn(7, D, dtype=torch.bfloat16))
    assert logits.dtype == scores.dtype == w.dtype == torch.float32
    assert m(torch.randn(1, 7, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_aux_loss_uniform_is_one_and_formula():
    m, _ = make_moe(aux_loss_coef=0.5)
    with torch.no_grad():
        m.router.weight.zero_()                        # every token: P_e = 1/E
    m.train()
    m(torch.randn(2, 6, D))
    assert moe_metrics_of(m)["aux_loss"] == pytest.approx(1.0, abs=1e-6)    # coef * aux = coef
    f = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert load_balancing_loss(f, p).item() == pytest.approx(4 * (0.04 + 0.06 + 0.06 + 0.04))
    assert load_balancing_loss(torch.full((4,), 0.25), p).item() == pytest.approx(1.0)   # uniform f


def moe_metrics_of(m):
    return m.metrics(reset=True)


def test_z_loss_value():
    m, _ = make_moe()
    x = torch.randn(1, 9, D)
    m.train()
    m(x)
    logits = x[0] @ m.router.weight.T
    expect = torch.logsumexp(logits, -1).square().mean().item()
    assert moe_metrics_of(m)["z_loss"] == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_aux_losses_reach_router_across_a_pipeline_cut(scale):
    """Stage 1 = MoE, stage 2 = a loss on its detached output (DeepSpeed pipeline style): the router
    gradient gains exactly scale * d(a * aux + c * z)/dW, though no one adds the aux losses."""
    a, c = 0.3, 0.05
    x = torch.randn(2, 8, D)
    target = torch.randn(2, 8, D)
    grads = {}
    for coefs, main in (((0.0, 0.0), 1.0), ((a, c), 1.0), ((a, c), 0.0)):
        m, _ = make_moe(aux_loss_coef=coefs[0], z_loss_coef=coefs[1])
        m.train()
        set_aux_loss_scale(m, scale)
        h = m(x)
        h2 = h.detach().requires_grad_()
        ((h2 - target) ** 2).mean().mul(scale * main).backward()   # stage 2 (loss scaled like the main loss)
        h.backward(h2.grad)                                       # stage 1 gets the activation gradient
        grads[coefs, main] = m.router.weight.grad.clone()
    m, _ = make_moe()
    logits, scores, idx, _ = m.router(x.reshape(-1, D))
    counts = torch.bincount(idx.reshape(-1), minlength=E).float()
    aux = load_balancing_loss(counts / counts.sum(), scores.mean(0))
    z = torch.logsumexp(logits, -1).square().mean()
    (extra,) = torch.autograd.grad(scale * (a * aux + c * z), m.router.weight)
    torch.testing.assert_close(grads[(a, c), 0.0], extra, atol=1e-7, rtol=1e-5)     # the aux part alone
    torch.testing.assert_close(grads[(a, c), 1.0] - grads[(0.0, 0.0), 1.0], extra, atol=1e-6, rtol=1e-3)


def test_no_aux_gradient_in_eval():
    x = torch.randn(1, 4, D)
    grads = []
    for coef in (1.0, 0.0):
        m, _ = make_moe(aux_loss_coef=coef, z_loss_coef=coef)
        m.eval()
        m(x).sum().backward()
        grads.append(m.router.weight.grad)
    assert torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------- aux-loss-free bias
def test_bias_update_direction_and_selection_only():
    model = build_model(make_cfg(bias_update_rate=0.1))
    moes = [layer.mlp for layer in model.layers.values()]
    moes[0].router.load.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    update_moe_biases(model)
    assert moes[0].router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])   # over -> down
    assert moes[0].router.load.sum() == 0
    assert moes[1].router.expert_bias.abs().sum() == 0          # no load counted: no move
    # a large bias forces the selection, the weights stay the router's scores
    r = moes[0].router
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    x = torch.randn(6, D)
    logits, scores, idx, w = r(x)
    assert (idx == 3).any(-1).all()
    torch.testing.assert_close(w, (scores.gather(-1, idx) / scores.gather(-1, idx).sum(-1, keepdim=True)))
    # loads are counted in training only, and the buffer is saved with the model
    model.train()
    model(torch.randint(0, 64, (2, 5)))
    assert moes[0].router.load.sum() == 2 * 5 * 2
    model.eval()
    model(torch.randint(0, 64, (2, 5)))
    assert moes[0].router.load.sum() == 2 * 5 * 2
    assert "layers.0.mlp.router.expert_bias" in model.state_dict()
    assert "layers.0.mlp.router.load" not in model.state_dict()


# ---------------------------------------------------------------- capacity
def crafted(choices, cf):
    """A top-2 MoE whose token t picks exactly choices[t] = (first, second) (with router weights
    e_i picking coordinate i of x)."""
    m, cfg = make_moe(top_k=2, capacity_factor=cf, renormalize=True)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, :E] = 10 * torch.eye(E)
    x = torch.randn(1, len(choices), D) * 0.1
    x[..., :E] = 0
    for t, (i, j) in enumerate(choices):
        x[0, t, i], x[0, t, j] = 1.0, 0.5
    return m, x


def test_capacity_drops_exactly_the_overflow_in_token_order():
    # 8 tokens, top-2, 4 experts: capacity = ceil(0.5 * 8 * 2 / 4) = 2
    choices = [(0, 1), (0, 2), (0, 1), (1, 0), (0, 3), (2, 0), (2, 1), (3, 2)]
    # expert 0 chosen by tokens 0,1,2,3,4,5 -> keeps 0,1; expert 1 by 0,2,3,6 -> keeps 0,2;
    # expert 2 by 1,5,6,7 -> keeps 1,5; expert 3 by 4,7 -> keeps both. dropped 4 + 2 + 2 + 0 = 8 of 16
    m, x = crafted(choices, cf=0.5)
    _, _, idx, _ = m.router(x.reshape(-1, D))
    assert [tuple(sorted(r)) for r in idx.tolist()] == [tuple(sorted(c)) for c in choices]
    m.train()
    y = m(x)
    met = m.metrics()
    assert met["dropped_frac"] == 0.5
    assert met["tokens_per_expert_max"] == 6 and met["tokens_per_expert_mean"] == 4    # before drops
    m.eval()                                      # eval is dropless (and records no metrics)
    with torch.no_grad():
        full = m(x)
    assert m.metrics() == {}
    kept = {0: {0, 1}, 1: {0, 2}, 2: {1, 5}, 3: {4, 7}}
    intact = [t for t, c in enumerate(choices) if all(t in kept[e] for e in c)]
    assert intact == [0, 1]
    torch.testing.assert_close(y[0, intact], full[0, intact])        # nothing dropped: the dropless output
    # token 3 lost both experts: zero (the residual carries it); token 4 kept only expert 3
    assert torch.equal(y[0, 3], torch.zeros(D))
    logits = m.router.weight @ x[0, 4]
    p = logits.softmax(-1)
    w3 = p[3] / (p[0] + p[3])
    only3 = reference_single_expert(m, x[0, 4], 3)
    torch.testing.assert_close(y[0, 4], w3 * only3, atol=1e-6, rtol=1e-5)


def reference_single_expert(m, v, e):
    ex = m.experts
    h = F.silu(ex.w_gate.weight[e] @ v) * (ex.w_up.weight[e] @ v)
    return ex.w_out.weight[e] @ h


def test_capacity_formula():
    from forge.models.layers.moe_dispatch import capacity_for
    assert capacity_for(1.0, 10, 2, 4) == 5
    assert capacity_for(1.25, 10, 2, 4) == math.ceil(6.25)
    assert capacity_for(0.1, 3, 1, 8) == 1


# ---------------------------------------------------------------- metrics, config
def test_moe_metrics_average_layers_and_reset():
    model = build_model(make_cfg(aux_loss_coef=0.01, capacity_factor=1.0))
    model.train()
    for _ in range(2):
        model(torch.randint(0, 64, (2, 8)))
    met = moe_metrics(model)
    assert set(met) == {"moe/aux_loss", "moe/z_loss", "moe/dropped_frac", "moe/load_max_over_mean",
                        "moe/tokens_per_expert_max", "moe/tokens_per_expert_mean"}
    assert met["moe/tokens_per_expert_mean"] == 2 * 8 * 2 / E
    assert met["moe/aux_loss"] >= 1.0 - 1e-6 or met["moe/aux_loss"] > 0
    assert moe_metrics(model) == {}


def test_all_parameters_get_gradients():
    model = build_model(make_cfg(n_shared_experts=1, shared_gate=True, aux_loss_coef=0.01, z_loss_coef=1e-3))
    ids = torch.randint(0, 64, (2, 17))
    model.loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    ex = model.layers["0"].mlp.experts.w_gate.weight
    assert ex.expert and not hasattr(ex, "allreduce")    # at ep=1 DeepSpeed reduces experts like dense
    assert not hasattr(model.layers["0"].mlp.router.weight, "expert")


@pytest.mark.parametrize("overrides, fragment", [
    (["model.moe.n_experts=4", "model.moe.top_k=5"], "model.moe.top_k"),
    (["model.moe.n_experts=4", "parallel.zero_stage=3"], "zero_stage=3"),
    (["model.moe.n_experts=4", "parallel.ep=3"], "parallel.ep=3 does not divide"),
    (["parallel.ep=2"], "needs a mixture-of-experts"),
    (["model.moe.n_experts=4", "model.moe.router=hash"], "model.moe.router"),
    (["model.moe.n_experts=4", "model.moe.every=0"], "model.moe.every"),
    (["model.moe.n_experts=4", "model.moe.capacity_factor=0"], "capacity_factor"),
    (["model.moe.n_experts=4", "model.moe.shared_gate=true"], "n_shared_experts"),
])
def test_config_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, ["model.preset=tiny-llama", *overrides])


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_2_with_moe_is_accepted(stage):
    """Experts split over ep=2 under ZeRO-1/2 validate and give a DeepSpeed config of that stage
    (stage 3 is refused: test_config_errors)."""
    from forge.train.engine import build_ds_config
    cfg = load_config(None, ["model.preset=tiny-mixtral", f"parallel.zero_stage={stage}", "parallel.ep=2"])
    assert build_ds_config(cfg, 2)["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-olmoe"])
def test_kv_cache_decoding_equals_full_forward(preset):
    from forge.models.presets import PRESETS
    base = PRESETS[preset]
    cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, capacity_factor=0.5))   # eval: dropless
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    cache = model.new_cache()
    with torch.no_grad():
        ref = model(ids)
        steps = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_records_once_and_same_gradients():
    cfg = make_cfg(aux_loss_coef=0.1, z_loss_coef=0.01, bias_update_rate=0.1)
    ids = torch.randint(0, 64, (2, 9))
    grads, loads, mets = [], [], []
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.set_activation_checkpointing(mode)
        model.train()
        model.loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        loads.append(model.layers["0"].mlp.router.load.clone())
        mets.append(moe_metrics(model))
    assert loads[0].sum() == 2 * 8 * 2 and torch.equal(loads[0], loads[1])
    assert mets[0] == mets[1]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
