"""train.init_from: a fresh run from pretrained weights, under one process and tp=2 x pp=2.

A tiny random Hugging Face Llama and Mixtral: the loss of step 1 (the first batch, before any
update) equals transformers' loss on that batch, so every rank read its part of the weights;
the run's final checkpoint exports to an HF folder that transformers loads with logits equal to
Forge's. Shape-changing overrides are refused naming the key; a Forge checkpoint is a source too.
"""
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_hf_parity import LLAMA, make_hf_model
from tests.test_moe_hf import SMALL

HF_CASES = {
    "llama": ("llama", "LlamaForCausalLM", dict(LLAMA, vocab_size=96, max_position_embeddings=64)),
    "mixtral": ("mixtral", "MixtralForCausalLM", dict(SMALL, vocab_size=96, num_local_experts=4,
                                                      max_position_embeddings=64)),
}


def _job(out, cache, source, extra=()):
    from forge.config import load_config
    return load_config(None, [f"train.init_from={source}", f"train.out_dir={out}", f"data.cache_dir={cache}",
                              "data.seq_len=32", "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=4",
                              "train.eval_interval=0", "train.save_interval=2", "train.log_interval=1",
                              "log.progress=false", "optim.warmup_steps=1", "optim.lr=1e-3", *extra])


def _train(rank, world, out, cache, source, extra):
    from forge.train.trainer import train
    train(_job(out, cache, source, extra), explicit=frozenset({"data.seq_len"}))


def _first_batch_loss(logits_of, cfg):
    """A model's mean token loss on the run's first global batch (8 sequences)."""
    from forge.data import batch_iterator, build_data
    bundle = build_data(cfg.data, seed=cfg.train.seed, work_dir=cfg.data.cache_dir)
    batch = next(batch_iterator(bundle.train, micro_batch_size=8, dp_rank=0, dp_size=1, consumed_samples=0))
    with torch.no_grad():
        logits = logits_of(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).item()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(HF_CASES))
@pytest.mark.parametrize("world, parallel", [(1, []), (4, ["parallel.tp=2", "parallel.pp=2"])], ids=["one", "tp2pp2"])
def test_init_from_hf_matches_transformers(tmp_path, family, world, parallel):
    import json

    from transformers import AutoModelForCausalLM

    from forge.models.hf.convert import from_pretrained, write_hf_folder
    from forge.models.io import read_model_config, read_weights
    model_type, arch, kwargs = HF_CASES[family]
    hf = make_hf_model(model_type, arch, kwargs)
    src = str(tmp_path / "hf")
    hf.save_pretrained(src)
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    if world == 1:
        _train(0, 1, out, cache, src, parallel)
    else:
        run_distributed(_train, world, out, cache, src, parallel)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    ref = _first_batch_loss(lambda x: hf(x).logits, _job(out, cache, src))
    assert abs(losses[0] - ref) <= 1e-5 * abs(ref), (losses[0], ref)
    # a few steps later: the checkpoint exports to a folder transformers loads, with Forge's logits
    folder = os.path.join(out, "checkpoints", "step_00000002", "model")
    exported = str(tmp_path / "exported")
    write_hf_folder(exported, read_model_config(folder), read_weights(folder))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(exported).eval()(ids).logits
        ours = from_pretrained(folder)(ids)
    torch.testing.assert_close(ours[..., :96], theirs, atol=1e-4, rtol=1e-4)


def test_shape_changing_override_is_refused(tmp_path):
    from forge.config import ConfigError
    from forge.train.trainer import train
    hf = make_hf_model(*HF_CASES["llama"])
    hf.save_pretrained(str(tmp_path / "hf"))
    cfg = _job(str(tmp_path / "run"), str(tmp_path / "cache"), str(tmp_path / "hf"), ["model.d_model=128"])
    with pytest.raises(ConfigError, match=r"model.d_model=128 \(the source has 64\)"):
        train(cfg, explicit=frozenset({"model.d_model"}))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_init_from_a_forge_checkpoint_starts_from_its_weights(tmp_path):
    """A fresh run from a checkpoint step dir starts at step 0 (new optimizer) from its weights:
    its first loss is the saved model's loss on that batch."""
    from forge.config import load_config
    from forge.models.hf.convert import from_pretrained
    from forge.train.trainer import train
    from tests.test_parallel_layouts import job
    cache = str(tmp_path / "cache")
    over = job(str(tmp_path / "a"), cache, "tiny-llama", 1)
    train(load_config(None, over + ["train.save_interval=4"]))
    step4 = str(tmp_path / "a" / "checkpoints" / "step_00000004")
    cfg = load_config(None, [o for o in over if not o.startswith(("train.out_dir", "model.preset"))]
                      + [f"train.out_dir={tmp_path / 'b'}", f"train.init_from={step4}", "train.max_steps=1"])
    result = train(cfg)
    assert result.start_step == 0 and len(result.losses) == 1
    saved = from_pretrained(step4)
    ref = _first_batch_loss(lambda x: saved(x)[..., :saved.cfg.vocab_size], cfg)
    assert abs(result.losses[0] - ref) <= 1e-5 * abs(ref), (result.losses[0], ref)
