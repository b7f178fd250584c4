"""Steering vectors: manual ones (forge.steer: injection point, extraction, decoding with the KV cache, CLI)
and learned ones (model.steering_layer: zero start, training the vector alone, tp / pp layouts)."""
import pytest
import torch
from safetensors import safe_open

from forge.config import ModelConfig
from forge.generate import generate, main as generate_main
from forge.models.transformer import build_model
from forge.steer import load_vector, main as steer_main, mean_difference, set_steering

from test_generate import _save_folder


def _model(n_layers=4):
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=50, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=32))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.12)
    return m.eval()


def _hidden(model, ids):
    """Each block's output captured by forward hooks, then the logits."""
    outs, hooks = [], [layer.register_forward_hook(lambda m, i, o: outs.append(o.clone()))
                       for layer in model.layers.values()]
    try:
        logits = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def test_zero_vector_changes_nothing():
    m, ids = _model(), torch.randint(0, 50, (2, 9))
    ref = m(ids)
    set_steering(m, torch.zeros(32), layer=1, scale=3.0)
    assert torch.equal(m(ids), ref)


def test_vector_changes_exactly_the_layers_after_it():
    m, ids = _model(), torch.randint(0, 50, (2, 9))
    ref, ref_logits = _hidden(m, ids)
    set_steering(m, torch.randn(32), layer=1)
    got, logits = _hidden(m, ids)
    # a block's hook sees its output before the steering vector is added after block 1
    for i in (0, 1):
        assert torch.equal(got[i], ref[i]), i
    for i in (2, 3):
        assert not torch.allclose(got[i], ref[i]), i
    assert not torch.allclose(logits, ref_logits)
    set_steering(m, None)
    assert torch.equal(m(ids), ref_logits)


def test_steering_on_the_last_layer_shifts_the_final_norm_input():
    m, ids = _model(n_layers=2), torch.randint(0, 50, (1, 5))
    v = torch.randn(32)
    outs, _ = _hidden(m, ids)
    set_steering(m, v, layer=1, scale=0.5)
    expected = m.head(m.norm(outs[1] + 0.5 * v))
    assert torch.allclose(m(ids), expected, atol=1e-6)


def test_extract_identical_sets_is_exactly_zero():
    m = _model()
    prompts = [torch.randint(0, 50, (n,)).tolist() for n in (3, 7, 5)]
    v = mean_difference(m, prompts, [list(p) for p in prompts], layer=2)
    assert torch.equal(v, torch.zeros(32))


def test_extract_is_the_mean_difference_of_hooked_hidden_states():
    m, L = _model(), 2
    pos = [torch.randint(0, 50, (n,)).tolist() for n in (3, 7)]
    neg = [torch.randint(0, 50, (n,)).tolist() for n in (4, 2, 6)]

    def token_mean(prompts):      # every token of every prompt, weighted equally
        rows = [_hidden(m, torch.tensor([p]))[0][L][0] for p in prompts]
        return torch.cat(rows).double().mean(0)

    v = mean_difference(m, pos, neg, layer=L)
    assert torch.allclose(v.double(), token_mean(pos) - token_mean(neg), atol=1e-6)
    assert v.abs().max() > 1e-3


def test_kv_cache_decoding_with_steering_equals_recomputation():
    m, ids = _model(), torch.randint(0, 50, (2, 5))
    set_steering(m, torch.randn(32), layer=1, scale=2.0)
    cached = generate(m, ids, 12, temperature=0, use_cache=True)
    recomputed = generate(m, ids, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    # and logit by logit: prompt into the cache, then tokens one at a time, vs the whole sequence
    seq = cached
    cache = m.new_cache()
    step = [m(seq[:, :5], cache=cache)] + [m(seq[:, t:t + 1], cache=cache) for t in range(5, seq.shape[1])]
    assert torch.allclose(torch.cat(step, 1), m(seq), atol=1e-5)
    set_steering(m, None)
    assert not torch.equal(generate(m, ids, 12, temperature=0), cached)


def test_cli_extract_then_generate_with_the_vector(tmp_path, capsys):
    model, tok = _save_folder(tmp_path / "m")
    (tmp_path / "pos.txt").write_text("love and joy\nsweet friend\n\n")
    (tmp_path / "neg.txt").write_text("hate and woe\n")
    out = tmp_path / "vec.safetensors"
    assert steer_main(["extract", "--checkpoint", str(tmp_path / "m"), "--positive", str(tmp_path / "pos.txt"),
                       "--negative", str(tmp_path / "neg.txt"), "--layer", "0", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["layer"] == "0"
    v, layer = load_vector(str(out))
    enc = [tok.encode(s) for s in ("love and joy", "sweet friend")], [tok.encode("hate and woe")]
    assert layer == 0 and torch.allclose(v, mean_difference(model, *enc, layer=0))

    ids = torch.tensor([tok.encode("ROMEO:")])
    set_steering(model, v, layer, scale=8.0)
    ref = generate(model, ids, 10, temperature=0)[0, ids.shape[1]:].tolist()
    if tok.eod_id in ref:
        ref = ref[: ref.index(tok.eod_id)]
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(tmp_path / "m"), "--prompt", "ROMEO:", "--max-new-tokens", "10",
                          "--temperature", "0", "--no-echo", "--steer", str(out), "--steer-scale", "8"]) == 0
    assert capsys.readouterr().out == tok.decode(ref) + "\n"
    # a layer the model does not have is refused, naming it
    assert steer_main(["extract", "--checkpoint", str(tmp_path / "m"), "--positive", str(tmp_path / "pos.txt"),
                       "--negative", str(tmp_path / "neg.txt"), "--layer", "5", "--out", str(out)]) == 2
    assert "outside the model's layers" in capsys.readouterr().err


# ------------------------------------------------------------------ learned steering vectors
def _learned(layer, **kw):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=4, max_seq_len=32, steering_layer=layer, **kw)
    return build_model(cfg, seed=3).eval()


def test_learned_vector_starts_at_zero_and_changes_nothing():
    ids = torch.randint(0, 50, (2, 9))
    plain, steered = _learned(None), _learned(2)
    assert torch.equal(steered.layers["2"].steering, torch.zeros(32))
    assert [n for n, _ in steered.named_parameters() if "steering" in n] == ["layers.2.steering"]
    assert torch.equal(steered(ids), plain(ids))          # same seed: every other weight is the same


def test_learned_vector_is_added_after_its_block_as_the_manual_one():
    ids, v = torch.randint(0, 50, (2, 9)), torch.randn(32)
    learned, manual = _learned(1), _learned(None)
    with torch.no_grad():
        learned.layers["1"].steering.copy_(v)
    set_steering(manual, v, layer=1)
    assert torch.allclose(learned(ids), manual(ids), atol=1e-6)
    ref, _ = _hidden(_learned(None), ids)
    got, _ = _hidden(learned, ids)           # block 1's hook sees its output with v added
    assert torch.equal(got[0], ref[0])
    assert torch.allclose(got[1], ref[1] + v, atol=1e-6)
    assert not torch.allclose(got[2], ref[2])


def test_steering_config_is_validated():

    from forge.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.steering_layer"):
        load_config(None, ["model.n_layers=2", "model.steering_layer=2"])
    with pytest.raises(ConfigError, match="needs model.steering_layer"):
        load_config(None, ["model.steering_freeze_model=true"])


def test_frozen_model_trains_only_the_steering_vector(tmp_path):
    from forge.models.io import load_model_folder
    from forge.train.trainer import train
    from test_train import tiny
    extra = ("model.steering_layer=0", "model.steering_freeze_model=true", "train.max_steps=10", "optim.lr=3e-2",
             "optim.warmup_steps=1")
    r = train(tiny(tmp_path / "run", str(tmp_path / "cache"), *extra))
    start = build_model(r.config.model, seed=r.config.train.seed)
    trained, _ = load_model_folder(r.checkpoint + "/model")
    after = dict(trained.named_parameters())
    for name, p in start.named_parameters():
        if name == "layers.0.steering":
            assert torch.equal(p, torch.zeros(32)) and after[name].abs().max() > 1e-3
        else:
            assert torch.equal(after[name], p), name         # bit-equal: frozen
    assert sum(r.losses[-3:]) < sum(r.losses[:3])            # the vector alone lowers the loss
    # stopped at step 5 and resumed: the same run, bit for bit (the optimizer state is the vector's alone)
    first = train(tiny(tmp_path / "split", str(tmp_path / "cache"), *extra), stop_at=5)
    second = train(tiny(tmp_path / "split", str(tmp_path / "cache"), *extra, "train.resume=auto"))
    assert second.start_step == 5 and first.losses + second.losses == r.losses


STEERED = [  # (parallel layout, steering overrides): the vector replicated over tp; on its layer's stage under pp
    (dict(tp=2), ["model.steering_layer=1", "model.steering_freeze_model=true"]),
    (dict(tp=2, sequence_parallel="true"), ["model.steering_layer=1", "model.steering_freeze_model=true"]),
    (dict(pp=2), ["model.steering_layer=1"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("parallel, steering", STEERED, ids=["tp2-frozen", "tp2-sp-frozen", "pp2"])
def test_learned_steering_layout_matches_one_process(tmp_path_factory, parallel, steering):
    """A learned steering run under tp / pp: the same losses and final weights (vector included) as one process."""
    from tests.test_parallel_layouts import job, run
    cache = str(tmp_path_factory.mktemp("steer-data"))
    ref_losses, ref_weights, _ = run(job(str(tmp_path_factory.mktemp("ref")), cache, "tiny-llama", 1) + steering, 1)
    losses, weights, _ = run(job(str(tmp_path_factory.mktemp("lay")), cache, "tiny-llama", 1, **parallel) + steering, 2)
    assert "layers.1.steering" in weights and ref_weights["layers.1.steering"].abs().max() > 0
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        if name.endswith("attn.wk.bias"):
            continue
        err = (weights[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: relative difference {err:.2e}"
