"""optim.name: each optimizer's step against a reference written here from its paper's update rule
(or torch.optim's own class), its parameter groups, the settings it refuses, exact resume in one
process, and (slow) the elementwise ones under ZeRO 1 and tp = 2 against one process."""
from __future__ import annotations

import math
import os

import pytest
import torch

from forge.config import ConfigError, load_config
from forge.train.optimizers import (OPTIMIZERS, SOAP, Adafactor, Lion, Muon, build_client_optimizer, newton_schulz5,
                                    param_groups, state_count)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    b = torch.nn.Parameter(torch.randn(4, generator=g))
    grads = [[torch.randn(6, 4, generator=g), torch.randn(4, generator=g)] for _ in range(3)]
    return w, b, grads


def _run(opt, params, grads):
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()


def test_lion_matches_the_papers_update():
    """Chen et al. 2023, Algorithm 2: c = b1 m + (1 - b1) g; w -= lr (sign(c) + wd w); m = b2 m + (1 - b2) g."""
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    w, b, grads = _params()
    ref = [w.detach().clone(), b.detach().clone()]
    m = [torch.zeros_like(x) for x in ref]
    for gs in grads:
        for i, g in enumerate(gs):
            c = b1 * m[i] + (1 - b1) * g
            ref[i] = ref[i] - lr * (torch.sign(c) + wd * ref[i])
            m[i] = b2 * m[i] + (1 - b2) * g
    opt = Lion([w, b], lr=lr, betas=(b1, b2), weight_decay=wd)
    _run(opt, [w, b], grads)
    torch.testing.assert_close(w.detach(), ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[w]["exp_avg"], m[0], rtol=0, atol=1e-7)


def test_sgd_is_torchs_with_the_configs_settings():
    """optim.name=sgd builds torch.optim.SGD with optim.lr/momentum/nesterov/weight_decay."""
    cfg = load_config(None, ["optim.name=sgd", "optim.momentum=0.8", "optim.nesterov=true", "optim.weight_decay=0.05",
                             "optim.lr=0.1"])
    w, b, grads = _params()
    w2, b2 = (torch.nn.Parameter(x.detach().clone()) for x in (w, b))
    _run(build_client_optimizer([{"params": [w, b], "weight_decay": 0.05}], cfg.optim), [w, b], grads)
    _run(torch.optim.SGD([w2, b2], lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05), [w2, b2], grads)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    # closed form of the first step (buffer = g): w -= lr (g + mu g), g including decay
    w3 = torch.nn.Parameter(torch.ones(2))
    opt = build_client_optimizer([{"params": [w3], "weight_decay": 0.0}], cfg.optim)
    w3.grad = torch.tensor([1.0, -2.0])
    opt.step()
    torch.testing.assert_close(w3.detach(), torch.tensor([1 - 0.1 * 1.8, 1 + 0.1 * 3.6]))


def test_adafactor_keeps_factored_moments_as_the_paper_says():
    """Shazeer & Stern 2018 with torch's relative step: for a matrix R = mean_j g^2 (rows), C = mean_i g^2
    (columns), both as lerp with 1 - b2_t = t^-0.8; V = R C / mean(R); u = g / sqrt(V); step
    min(lr, 1/sqrt(t)) * max(1e-3, RMS(w)) / max(1, RMS(u)); decay w *= 1 - lr wd; vectors keep V = g^2 itself."""
    lr, wd = 0.01, 0.1
    w, b, grads = _params(1)
    ref = [w.detach().clone(), b.detach().clone()]
    R, C, V = torch.zeros(6, 1), torch.zeros(1, 4), torch.zeros(4)
    eps1 = torch.finfo(torch.float32).eps
    for t, (gw, gb) in enumerate(grads, 1):
        beta = t ** -0.8
        for i, g in enumerate((gw, gb)):
            x = ref[i]
            alpha = max(1e-3, (x.pow(2).mean().sqrt()).item()) * min(lr, 1 / math.sqrt(t))
            x = x * (1 - lr * wd)
            if g.dim() == 2:
                R = R + beta * ((g * g).mean(1, keepdim=True) - R)
                C = C + beta * ((g * g).mean(0, keepdim=True) - C)
                v = R @ C / R.mean().clamp(min=eps1)
            else:
                V = V + beta * (g * g - V)
                v = V
            u = g / v.clamp(min=eps1 ** 2).sqrt()
            ref[i] = x - alpha / max(1.0, u.pow(2).mean().sqrt().item()) * u
    opt = Adafactor([w, b], lr=lr, weight_decay=wd)
    _run(opt, [w, b], grads)
    assert opt.state_shapes(w) == {"row_var": (6, 1), "col_var": (1, 4)}
    torch.testing.assert_close(opt.state[w]["row_var"], R)
    torch.testing.assert_close(opt.state[w]["col_var"], C)
    torch.testing.assert_close(w.detach(), ref[0])
    torch.testing.assert_close(b.detach(), ref[1])


def test_newton_schulz_orthogonalises():
    """NS5 of G = U S V^T is close to U V^T: its singular values lie in about [0.7, 1.2] and its
    singular vectors are G's (the iteration is an odd polynomial in G)."""
    g = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    for G in (g, g.T):
        O = newton_schulz5(G, 5)
        s = torch.linalg.svdvals(O)
        assert s.min() > 0.6 and s.max() < 1.25, s
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        torch.testing.assert_close(U.T @ O @ Vh.T, torch.diag(torch.diagonal(U.T @ O @ Vh.T)), atol=2e-4, rtol=0)


def test_muon_matrix_and_adamw_halves():
    """Muon (Jordan et al. 2024, nesterov): b = mu b + g; u = g + mu b; w -= lr (0.2 sqrt(max(R, C)) NS5(u)
    + wd w). The AdamW half equals torch.optim.AdamW."""
    lr, mu, wd = 0.02, 0.95, 0.1
    w, b, grads = _params(2)
    ref_w = w.detach().clone()
    b2 = torch.nn.Parameter(b.detach().clone())
    buf = torch.zeros_like(ref_w)
    a, bb, c = 3.4445, -4.7750, 2.0315
    for gs in grads:
        g = gs[0]
        buf = mu * buf + g
        u = (g + mu * buf).T                            # 6 x 4 is tall: iterate on its 4 x 6 transpose
        x = u / (u.norm() + 1e-7)
        for _ in range(5):
            A = x @ x.T
            x = a * x + (bb * A + c * A @ A) @ x
        ref_w = ref_w * (1 - lr * wd) - lr * 0.2 * math.sqrt(6) * x.T
    opt = Muon([{"params": [w], "use_muon": True, "weight_decay": wd},
                {"params": [b], "use_muon": False, "weight_decay": wd}], lr=lr, momentum=mu, nesterov=True,
               betas=(0.9, 0.95), eps=1e-8)
    _run(opt, [w, b], grads)
    torch.testing.assert_close(w.detach(), ref_w, rtol=0, atol=1e-5)
    adam = torch.optim.AdamW([b2], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    _run(adam, [b2], [[gs[1]] for gs in grads])
    torch.testing.assert_close(b.detach(), b2.detach(), rtol=0, atol=1e-7)
    assert opt.state_shapes(w) == {"momentum_buffer": (6, 4)} and set(opt.state_shapes(b)) == {"exp_avg", "exp_avg_sq"}


# ---------------------------------------------------------------- SOAP
def _soap(w, lr=0.01, wd=0.1, freq=10, extra=()):
    return SOAP([{"params": [w], "use_soap": True, "weight_decay": wd}, *extra], lr=lr, betas=(0.9, 0.95), eps=1e-8,
                precondition_frequency=freq)


def test_soap_in_a_diagonal_eigenbasis_is_adamw():
    """Closed form: the first step only builds L = (1 - b2) G1 G1^T and R = (1 - b2) G1^T G1 and leaves w as it is;
    with G1 diagonal of increasing magnitudes both are diagonal and increasing, so eigh's bases are the
    identity (up to signs, which cancel: V' takes squares and M' is rotated back), and with no later refresh
    (frequency 100) SOAP's steps 2..4 on dense gradients are torch.optim.AdamW's steps 1..3 exactly. The
    AdamW tensors (a bias) take AdamW from the first step."""
    g = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(5, 5, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    g1 = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64) * torch.tensor([1.0, -1, 1, -1, -1], dtype=torch.float64))
    dense = [torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    bias_grads = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4)]
    w2, b2 = (torch.nn.Parameter(x.detach().clone()) for x in (w, b))
    opt = _soap(w, freq=100, extra=[{"params": [b], "use_soap": False, "weight_decay": 0.0}])
    _run(opt, [w, b], [[g1, bias_grads[0]]])
    assert torch.equal(w, w2)                                            # the first step only preconditions
    assert torch.equal(opt.state[w]["q_left"].abs(), torch.eye(5, dtype=torch.float64))
    _run(opt, [w, b], [[d, gb] for d, gb in zip(dense, bias_grads[1:])])
    _run(torch.optim.AdamW([w2], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), [w2], [[d] for d in dense])
    _run(torch.optim.AdamW([b2], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0), [b2], [[x] for x in bias_grads])
    torch.testing.assert_close(w.detach(), w2.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(b.detach(), b2.detach(), rtol=0, atol=1e-13)


def test_soap_is_rotation_equivariant():
    """For orthogonal U, W: SOAP on U X W^T with gradients U G W^T gives U X_t W^T (L and R rotate, so
    their eigenbases do: Adam in that basis does not see U, W). Square 5 x 5 gradients, so L and R have
    distinct eigenvalues from the first step on (a rectangular G leaves a null space whose basis eigh
    picks freely); a refresh every 2 steps; 5 steps."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(5)]
    U = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    w, w_rot = torch.nn.Parameter(x.clone()), torch.nn.Parameter(U @ x @ W.T)
    _run(_soap(w, freq=2), [w], [[gr] for gr in grads])
    _run(_soap(w_rot, freq=2), [w_rot], [[U @ gr @ W.T] for gr in grads])
    assert (w.detach() - x).abs().max() > 1e-3                          # it moved
    torch.testing.assert_close(w_rot.detach(), U @ w.detach() @ W.T, rtol=0, atol=1e-12)


def test_soap_matches_a_reference_written_from_the_paper():
    """The algorithm in the module docstring, written out on a (6, 4) float64 tensor for 4 steps with a
    refresh every 2 Adam steps: call 1 builds L, R and Q_L, Q_R = eigh; each later call k + 1 rotates
    G' = Q_L^T G Q_R, M = b1 M + (1 - b1) G, V = b2 V + (1 - b2) G'^2,
    w = w (1 - lr wd) - lr Q_L (Q_L^T M Q_R / bc1 / (sqrt(V / bc2) + eps)) Q_R^T, then takes G into L, R
    and refreshes when k % 2 == 0. (L, R are formed with the same torch calls as the optimizer's, so
    eigh sees bit-equal input: L's 2-dimensional null space after one (6, 4) gradient has no unique basis.)"""
    lr, b1, b2, eps, wd, freq = 0.02, 0.9, 0.95, 1e-8, 0.1, 2
    g = torch.Generator().manual_seed(6)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    grads = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    ref = w.detach().clone()
    L, R = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    M, V = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)
    QL = QR = None
    for t, G in enumerate(grads, 1):
        k = t - 1
        if k > 0:
            Gr = QL.T @ G @ QR
            M = b1 * M + (1 - b1) * G
            V = b2 * V + (1 - b2) * Gr * Gr
            step = (QL.T @ M @ QR) / (1 - b1 ** k) / ((V / (1 - b2 ** k)).sqrt() + eps)
            ref = ref * (1 - lr * wd) - lr * QL @ step @ QR.T
        L, R = L.mul(b2).add(G @ G.T, alpha=1 - b2), R.mul(b2).add(G.T @ G, alpha=1 - b2)
        if k % freq == 0:
            QL, QR = torch.linalg.eigh(L)[1], torch.linalg.eigh(R)[1]
    opt = _soap(w, lr=lr, wd=wd, freq=freq)
    _run(opt, [w], [[gr] for gr in grads])
    torch.testing.assert_close(w.detach(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[w]["gg_left"], L, rtol=0, atol=1e-14)
    assert opt.state_shapes(w) == {"exp_avg": (6, 4), "exp_avg_sq": (6, 4), "gg_left": (6, 6), "gg_right": (4, 4),
                                   "q_left": (6, 6), "q_right": (4, 4)}


def _tiny_model(*extra):
    from forge.models.transformer import build_model
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.max_seq_len=32",
                             "model.tie_embeddings=false", *extra])
    return cfg, build_model(cfg.model, seed=0)


def test_param_groups_decay_and_muon_split():
    """Norms never decay; embeddings decay unless optim.decay_embeddings=false; muon takes the hidden
    matrices, AdamW the embedding, head and norms."""
    for extra in (("model.preset=tiny-gpt2",), ()):                   # gpt2: biases and learned positions
        cfg, model = _tiny_model(*extra)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, cfg.optim)}
        assert "embed.tok.weight" in groups["decay"] and all(n.endswith("weight") and "norm" not in n
                                                              for n in groups["decay"])
        assert all(model.get_parameter(n).dim() == 1 for n in groups["no_decay"])
    cfg, model = _tiny_model("model.preset=tiny-gpt2", "optim.decay_embeddings=false")
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in param_groups(model, cfg.optim) if g["weight_decay"] == 0 for p in g["params"]}
    assert {"embed.tok.weight", "embed.pos.weight"} <= no_decay
    assert no_decay - {"embed.tok.weight", "embed.pos.weight"} == {n for n, p in model.named_parameters() if p.dim() == 1}
    cfg, model = _tiny_model("optim.decay_embeddings=false", "optim.name=muon")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: ({names[id(p)] for p in g["params"]}, g["use_muon"], g["weight_decay"])
              for g in param_groups(model, cfg.optim)}
    assert groups["no_decay"] == ({"embed.tok.weight", "layers.0.attn_norm.weight", "layers.0.mlp_norm.weight",
                                   "norm.weight"}, False, 0.0)
    assert groups["decay"] == ({"head.proj.weight"}, False, cfg.optim.weight_decay)
    assert groups["decay_muon"][0] == {f"layers.0.{m}.weight" for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo",
                                                                     "mlp.w_gate", "mlp.w_up", "mlp.w_out")}
    assert groups["decay_muon"][1] is True
    # soap splits the same way; forge plan counts m, v and (R, R), (C, C) L, Q_L, R, Q_R for its matrices
    cfg, model = _tiny_model("optim.decay_embeddings=false", "optim.name=soap")
    names = {id(p): n for n, p in model.named_parameters()}
    soap_groups = {g["name"]: ({names[id(p)] for p in g["params"]}, g["use_soap"]) for g in param_groups(model, cfg.optim)}
    assert soap_groups["decay_soap"] == (groups["decay_muon"][0], True)
    assert soap_groups["decay"] == ({"head.proj.weight"}, False)
    counts = state_count(model, cfg.optim)
    by_name = {n: p for n, p in model.named_parameters()}
    for n in groups["decay_muon"][0]:
        rows, cols = by_name[n].shape
        assert counts[id(by_name[n])] * rows * cols == pytest.approx(2 * rows * cols + 2 * rows ** 2 + 2 * cols ** 2)
    assert counts[id(by_name["head.proj.weight"])] == 2


def test_bad_optimizer_settings_are_refused(tmp_path):
    from forge.train.engine import build_ds_config, check_supported
    with pytest.raises(ConfigError, match=r"optim.name='adam' is not one of \['adafactor', 'adamw', 'lion', 'muon', 'sgd', 'soap'\]"):
        check_supported(load_config(None, ["optim.name=adam"]))
    for name in ("muon", "adafactor", "soap"):
        with pytest.raises(ConfigError, match=rf"optim.name='{name}' with parallel.tp=2"):
            check_supported(load_config(None, [f"optim.name={name}", "parallel.tp=2"]))
        with pytest.raises(ConfigError, match=rf"optim.name='{name}' with parallel.zero_stage=1"):
            check_supported(load_config(None, [f"optim.name={name}", "parallel.zero_stage=1"]))
    for bad in ("optim.momentum=-0.1", "optim.muon_momentum=1.0", "optim.momentum=.nan"):
        with pytest.raises(ConfigError, match="optim.momentum=.* must be >= 0 and optim.muon_momentum=.* in"):
            check_supported(load_config(None, [bad]))
    with pytest.raises(ConfigError, match="optim.soap_precondition_frequency=0 must be .*>= 1"):
        load_config(None, ["optim.name=soap", "optim.soap_precondition_frequency=0"])
    with pytest.raises(ConfigError, match="soap rotates each whole matrix by the eigenbases"):
        check_supported(load_config(None, ["optim.name=soap", "parallel.tp=2"]))
    with pytest.raises(ConfigError, match="optim.muon_ns_steps=0 must be >= 1"):
        check_supported(load_config(None, ["optim.muon_ns_steps=0"]))
    with pytest.raises(ConfigError, match="optim.nesterov=true needs optim.momentum > 0"):
        check_supported(load_config(None, ["optim.name=sgd", "optim.nesterov=true", "optim.momentum=0"]))
    # adamw keeps DeepSpeed's optimizer entry; the others leave it out (Forge hands the optimizer over)
    assert build_ds_config(load_config(None, []), 1)["optimizer"]["type"] == "AdamW"
    assert "optimizer" not in build_ds_config(load_config(None, ["optim.name=lion"]), 1)
    assert set(OPTIMIZERS) == {"adamw", "lion", "sgd", "adafactor", "muon", "soap"}
    template = tmp_path / "opt.json"
    template.write_text('{"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}')
    with pytest.raises(ConfigError, match="configures an optimizer, but optim.name='sgd'"):
        build_ds_config(load_config(None, ["optim.name=sgd", f"parallel.ds_config={template}"]), 1)


# ---------------------------------------------------------------- training runs
def _tiny(out_dir, cache, *extra):
    return load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "model.dropout=0.1",
        "data.seq_len=32", f"data.cache_dir={cache}", "train.micro_batch_size=4", "train.max_steps=4",
        "optim.lr=3e-3", "optim.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0",
        "train.save_interval=0", f"train.out_dir={out_dir}", "log.progress=false", *extra])


@pytest.mark.parametrize("name", ["lion", "sgd", "adafactor", "muon", "soap"])
def test_resume_is_bit_exact_for_each_optimizer(tmp_path, data_cache, name):
    """lion, muon and soap lower the loss in 4 steps; steps 1..4 uninterrupted == steps 1..2, stop, resume=auto, steps 3..4 (weights and every state
    key of the optimizer through the sharded optim/ files); the optim/ files hold the optimizer's keys."""
    from forge.models.sharded import WeightReader
    from forge.train.trainer import train
    extra = (f"optim.name={name}",)
    full = train(_tiny(tmp_path / "full", data_cache, *extra))
    if name in ("lion", "muon", "soap"):    # sgd at lr 3e-3 and adafactor's relative step barely move in 4 steps
        assert full.losses[-1] < full.losses[0] - 0.02, full.losses             # it learns
    first = train(_tiny(tmp_path / "split", data_cache, *extra), stop_at=2)
    with WeightReader(os.path.join(first.checkpoint, "optim")) as reader:
        keys = {n.split("::")[1] for n in reader.names()}
    assert keys == {"lion": {"exp_avg"}, "sgd": {"momentum_buffer"}, "adafactor": {"row_var", "col_var", "variance"},
                    "muon": {"momentum_buffer", "exp_avg", "exp_avg_sq"},
                    "soap": {"exp_avg", "exp_avg_sq", "gg_left", "gg_right", "q_left", "q_right"}}[name]
    second = train(_tiny(tmp_path / "split", data_cache, *extra, "train.resume=auto"))
    assert second.start_step == 2
    assert first.losses + second.losses == full.losses                  # bit for bit
    assert first.grad_norms + second.grad_norms == full.grad_norms
    from forge.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=f"optim.name='{name}', the config has optim.name='adamw'"):
        train(_tiny(tmp_path / "split", data_cache, "train.resume=auto"))


# ---------------------------------------------------------------- layouts (slow: gloo processes)
LAYOUTS = [("lion", 2, dict(zero_stage=1)), ("lion", 1, dict(tp=2)), ("sgd", 2, dict(zero_stage=1)),
           ("sgd", 1, dict(pp=2))]
_REFS: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("name, dp, parallel", LAYOUTS, ids=[f"{n}-" + "-".join(f"{k}{v}" for k, v in p.items())
                                                              for n, _, p in LAYOUTS])
def test_elementwise_optimizers_under_zero1_tp_pp_match_one_process(tmp_path_factory, name, dp, parallel):
    """lion and sgd (nesterov) on DeepSpeed's flat ZeRO 1 partitions, on tp shards and on pipeline
    stages (DeepSpeed's PipelineEngine with a client optimizer; two gloo processes) give one process's
    losses and final weights within 1e-5; under ZeRO 1 stopped after step 2 and resumed (each rank's
    exp_avg / momentum_buffer fragments through the sharded optim/ files). (lion ran under pp = 2
    and sgd under tp = 2 too, once.)"""
    from tests.helpers import assert_same_training
    from tests.test_parallel_layouts import job, run
    cache = str(tmp_path_factory.mktemp("data")) if "cache" not in _REFS else _REFS["cache"]
    _REFS["cache"] = cache
    extra = [f"optim.name={name}"] + (["optim.nesterov=true", "optim.lr=0.05"] if name == "sgd" else [])
    if name not in _REFS:
        _REFS[name] = run(job(str(tmp_path_factory.mktemp(f"ref-{name}")), cache, "tiny-llama", 1) + extra, 1)
    ref_losses, ref_weights, _ = _REFS[name]
    over = job(str(tmp_path_factory.mktemp("layout")), cache, "tiny-llama", dp, **parallel) + extra
    if "zero_stage" in parallel:    # stop after step 2 and resume: the state of DeepSpeed's flat fragments
        from tests.distributed import run_distributed
        from tests.test_parallel_layouts import _train
        run_distributed(_train, 2, over, 2)
        over = over + ["train.resume=auto"]
    losses, weights, _ = run(over, 2)
    assert_same_training(losses, weights, ref_losses, ref_weights)
