"""Per-dataset learned steering vectors (model.steering_datasets): each sample's residual gets exactly
its dataset's row (hand check), zero rows change nothing, training on a blend of two datasets learns
two different vectors (and leaves a dataset with no samples at zero), the data order is unchanged,
generation picks a row with --steer-dataset, tp=2 (and sequence parallelism) trains like one process
(slow), and the layouts it cannot run (pp) are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forge.config import ConfigError, ModelConfig, load_config
from forge.models import build_model
from forge.steer import set_steering, set_steering_dataset

WORDS = {"a": ["abc", "cab", "bca"], "b": ["xyz", "zyx", "yzx"]}     # disjoint alphabets (and " ")


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two prepared folders, one of a/b/c words, one of x/y/z words, with one char tokenizer."""
    from forge.data.prepare import prepare
    from forge.data.tokenizer import CharTokenizer
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    tok = CharTokenizer.train(w for ws in WORDS.values() for w in ws + [" "])
    tok_dir = tok.save(str(root / "tok"))
    out = []
    for name in ("a", "b"):
        rows = [{"text": " ".join(rng.choice(WORDS[name], size=rng.integers(8, 30)))} for _ in range(60)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        prepare([str(root / f"{name}.jsonl")], str(root / name), tokenizer=tok_dir, shard_size=400)
        out.append(str(root / name))
    return out, tok


def _cfg(**kw):
    return ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, max_seq_len=16, **kw).validate()


def test_each_sample_gets_its_datasets_vector():
    """Block L's output for sample b is the unsteered block output + V[d_b], bit for bit; blocks before
    L see nothing of V; zero rows (the initial table) and dataset None give the unsteered logits."""
    steered = build_model(_cfg(steering_layer=1, steering_datasets=3), seed=4).eval()
    plain = build_model(_cfg(), seed=4).eval()               # the same weights (seeded by name)
    ids = torch.randint(0, 40, (4, 10), generator=torch.Generator().manual_seed(0))
    d = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        assert torch.equal(steered.layers["1"].steering, torch.zeros(3, 32))
        assert torch.equal(steered(ids, dataset=d), plain(ids))                  # zero vectors: no change
        assert torch.equal(steered(ids), plain(ids))                             # no dataset: no vector
        V = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
        steered.layers["1"].steering.copy_(V)
    outs = {}
    for name, m in (("steered", steered), ("plain", plain)):
        for i in ("0", "1"):
            m.layers[i].register_forward_hook(lambda mod, a, y, k=(name, i): outs.__setitem__(k, y))
    with torch.no_grad():
        steered(ids, dataset=d)
        plain(ids)
    assert torch.equal(outs["steered", "0"], outs["plain", "0"])
    for b in range(4):
        assert torch.equal(outs["steered", "1"][b], outs["plain", "1"][b] + V[d[b]]), b


def test_generation_row_equals_a_manual_vector():
    """set_steering_dataset(I) (forge generate --steer-dataset I) = the manual steering path with V[I]
    on the unsteered model, also through the KV cache; a bad index is an error naming the range."""
    from forge.generate import generate
    steered = build_model(_cfg(steering_layer=2, steering_datasets=2), seed=4).eval()
    plain = build_model(_cfg(), seed=4).eval()
    V = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        steered.layers["2"].steering.copy_(V)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    set_steering_dataset(steered, 1)
    set_steering(plain, V[1], layer=2)
    with torch.no_grad():
        torch.testing.assert_close(steered(ids), plain(ids), atol=1e-6, rtol=1e-6)
    a = generate(steered, ids, 6, temperature=0.0)
    b = generate(plain, ids, 6, temperature=0.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"outside the model's datasets 0\.\.1"):
        set_steering_dataset(steered, 2)
    with pytest.raises(ValueError, match="no per-dataset steering vectors"):
        set_steering_dataset(build_model(_cfg(steering_layer=2), seed=4), 0)


def test_dataset_ids_follow_the_blend_and_leave_the_order_unchanged(two_sets, tmp_path):
    """batch_iterator(with_dataset=True) draws the same token batches; each sample's id is the dataset
    whose alphabet its tokens use (an independent check of the id: the alphabets are disjoint)."""
    from forge.config import DataConfig
    from forge.data import batch_iterator, build_data
    paths, tok = two_sets
    cfg = DataConfig(dataset="indexed", paths=paths, blend=[0.6, 0.4], split=[1.0, 0.0, 0.0], seq_len=15,
                     cache_dir=str(tmp_path))
    train = build_data(cfg, seed=3, work_dir=str(tmp_path)).train
    letters = [set(tok.encode("".join(WORDS[n]))) for n in ("a", "b")]
    plain = batch_iterator(train, 4, dp_rank=1, dp_size=2, consumed_samples=8)
    tagged = batch_iterator(train, 4, dp_rank=1, dp_size=2, consumed_samples=8, with_dataset=True)
    seen = set()
    for _ in range(12):
        batch, d = next(tagged)
        assert torch.equal(batch, next(plain)) and d.shape == (4,) and d.dtype == torch.int64
        for row, k in zip(batch.tolist(), d.tolist()):
            assert set(row) & letters[k] and not set(row) & letters[1 - k], (row, k)
            seen.add(k)
    assert seen == {0, 1}


def _job(out, paths, cache, *extra):
    return load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16",
        "data.dataset=indexed", f"data.paths={json.dumps(paths)}", "data.split=[0.9,0.1,0.0]",
        f"data.cache_dir={cache}", "model.steering_layer=1", "model.steering_datasets=2",
        "model.steering_freeze_model=true", "train.micro_batch_size=4", "train.max_steps=12", "optim.lr=5e-2",
        "optim.warmup_steps=1", "train.log_interval=1", "train.eval_interval=6", "train.eval_steps=2",
        "train.save_interval=0", f"train.out_dir={out}", "log.progress=false", *extra])


def test_training_learns_one_vector_per_dataset(two_sets, tmp_path, capsys):
    """A frozen model trained on a blend of the a/b/c and x/y/z sets learns two different nonzero
    vectors; with the second set's blend weight 0 its vector never moves from zero. The trained run
    generates with --steer-dataset."""
    from forge.generate import main as generate_main
    from forge.models.io import load_model_folder
    from forge.train.trainer import train
    paths, _ = two_sets
    r = train(_job(tmp_path / "both", paths, tmp_path / "cache", "data.blend=[0.5,0.5]"))
    V = load_model_folder(r.checkpoint + "/model")[0].layers["1"].steering.detach()
    assert V.shape == (2, 32)
    n0, n1, gap = V[0].norm().item(), V[1].norm().item(), (V[0] - V[1]).norm().item()
    assert min(n0, n1) > 0.05 and gap > 0.5 * max(n0, n1)
    assert sum(r.losses[-3:]) < sum(r.losses[:3])
    one = train(_job(tmp_path / "one", paths, tmp_path / "cache", "data.blend=[1.0,0.0]"))
    W = load_model_folder(one.checkpoint + "/model")[0].layers["1"].steering.detach()
    assert torch.equal(W[1], torch.zeros(32)) and W[0].norm() > 0.05
    args = ["--checkpoint", str(tmp_path / "both"), "--prompt", "abc", "--max-new-tokens", "4", "--seed", "0"]
    assert generate_main(args + ["--steer-dataset", "1"]) == 0
    assert generate_main(args + ["--steer-dataset", "2"]) == 2
    assert "outside the model's datasets 0..1" in capsys.readouterr().err


def test_refused_configs(two_sets):
    paths, _ = two_sets
    base = ["model.steering_layer=1", "data.dataset=indexed", f"data.paths={json.dumps(paths)}"]
    with pytest.raises(ConfigError, match="model.steering_datasets=2 with parallel.pp=2 is not supported"):
        load_config(None, base + ["model.steering_datasets=2", "parallel.pp=2", "model.n_layers=2"])
    with pytest.raises(ConfigError, match=r"model.steering_datasets=3 must equal the number of datasets .*: 2"):
        load_config(None, base + ["model.steering_datasets=3"])
    with pytest.raises(ConfigError, match="model.steering_datasets > 0 needs model.steering_layer"):
        load_config(None, ["model.steering_datasets=1"])
    with pytest.raises(ConfigError, match="model.steering_datasets"):
        load_config(None, ["model.steering_layer=0", "model.steering_datasets=-1"])


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [["parallel.tp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"]],
                         ids=["tp2", "tp2-sp"])
def test_per_dataset_vectors_train_under_tp2_like_one_process(two_sets, tmp_path, parallel):
    """4 steps of `forge train` (every weight and the table trained) under tp=2, with and without
    sequence parallelism, give one process's losses and weights within 1e-5 relative."""
    from tests.test_parallel_layouts import STEPS, run
    paths, _ = two_sets

    def job(out):
        return ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16",
                "data.seq_len=16", "data.dataset=indexed", f"data.paths={json.dumps(paths)}",
                "data.split=[1.0,0.0,0.0]", "data.blend=[0.5,0.5]", f"data.cache_dir={tmp_path / 'cache'}",
                "model.steering_layer=1", "model.steering_datasets=2", "train.micro_batch_size=4",
                f"train.max_steps={STEPS}", "optim.lr=1e-2", "optim.warmup_steps=1", "optim.eps=1e-6",
                "train.log_interval=1", "train.eval_interval=0", "train.save_interval=0", f"train.out_dir={out}",
                "log.progress=false", "train.precision=fp32"]
    ref_losses, ref_w, _ = run(job(tmp_path / "ref"), 1)
    losses, w, _ = run(job(tmp_path / "tp") + parallel, 2)
    assert len(losses) == STEPS and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, ref_losses)), \
        (losses, ref_losses)
    assert w.keys() == ref_w.keys() and ref_w["layers.1.steering"].shape == (2, 32)
    assert (ref_w["layers.1.steering"].norm(dim=1) > 1e-3).all()          # both rows trained
    for key, ref in ref_w.items():
        err = (w[key] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{key}: relative difference {err:.2e}"
