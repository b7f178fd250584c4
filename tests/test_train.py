"""Training loop, schedules, gradient accumulation, outputs, CLI and signals (tiny models, in-process)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import types

import pytest
import torch

from forge.config import ConfigError, OptimConfig, load_config
from forge.train.schedule import lr_at
from forge.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(out_dir, cache, *extra):
    """A seconds-long config: d_model 32, 2 layers, 32-token sequences."""
    return load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32",
        "data.seq_len=32", f"data.cache_dir={cache}", "train.micro_batch_size=4", "train.max_steps=8",
        "optim.lr=3e-3", "optim.warmup_steps=2", "train.log_interval=1", "train.eval_interval=4",
        "train.eval_steps=2", "train.save_interval=4", f"train.out_dir={out_dir}", "log.progress=false",
        *extra])


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_values():
    o = OptimConfig(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=10)
    assert lr_at(1, o, 110) == pytest.approx(0.1)
    assert lr_at(5, o, 110) == pytest.approx(0.5)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.1 + 0.9 * 0.5)                 # halfway: cos(pi/2) = 0
    assert lr_at(35, o, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    assert lr_at(500, o, 110) == pytest.approx(0.1)


def test_wsd_and_constant_schedule_values():
    o = OptimConfig(lr=2.0, min_lr=0.0, schedule="wsd", warmup_steps=4, decay_frac=0.2)
    # max_steps 100: warmup 1..4, stable 5..80, linear decay 81..100 to 0
    assert lr_at(2, o, 100) == pytest.approx(1.0)
    assert lr_at(4, o, 100) == pytest.approx(2.0)
    assert lr_at(50, o, 100) == pytest.approx(2.0)
    assert lr_at(80, o, 100) == pytest.approx(2.0)
    assert lr_at(90, o, 100) == pytest.approx(1.0)
    assert lr_at(100, o, 100) == pytest.approx(0.0)
    c = OptimConfig(lr=1.0, schedule="constant", warmup_steps=0)
    assert lr_at(1, c, 10) == lr_at(1000, c, 10) == 1.0


# ---------------------------------------------------------------- training and outputs
def test_training_reduces_loss_and_writes_outputs(tmp_path, data_cache):
    from forge.models.io import load_model_folder
    out = tmp_path / "run"
    r = train(tiny(out, data_cache, "train.max_steps=12", "optim.lr=1e-2", "optim.schedule=wsd"))
    assert len(r.losses) == 12 and r.step == 12
    assert sum(r.losses[-3:]) / 3 < sum(r.losses[:3]) / 3 - 0.3
    assert r.config.model.vocab_size == 78                      # from the char tokenizer

    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == list(range(1, 13))
    for x in train_lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(x)
        assert x["lr"] == pytest.approx(lr_at(x["step"], r.config.optim, 12))
        assert x["grad_norm"] > 0 and x["tokens_per_s"] > 0
    assert [x["step"] for x in lines if "val_loss" in x] == [4, 8, 12]
    assert lines == r.metrics

    assert (out / "config.yaml").is_file() and (out / "tokenizer").is_dir()
    assert load_config(str(out / "config.yaml")).model.vocab_size == 78
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == \
        ["step_00000004", "step_00000008", "step_00000012"]
    last = ck / "step_00000012"
    assert (last / "COMPLETE").is_file() and not (last / "ds").exists()       # the weights and optimizer once:
    assert {p.name for p in (last / "optim").iterdir()} == {"forge_index.json", "shard-00000.safetensors"}
    assert (ck / "latest").read_text().strip() == "step_00000012"
    state = json.load(open(last / "trainer_state.json"))
    assert state["step"] == 12 and state["consumed_samples"] == 48 and state["config_hash"] == r.config.hash()
    model, mcfg = load_model_folder(str(last / "model"))       # what forge generate / convert read
    assert mcfg.vocab_size == 78
    batch = torch.randint(0, 78, (2, 16))
    assert model(batch).shape == (2, 16, 78)


def test_grad_accum_equals_bigger_micro_batch(tmp_path, data_cache):
    from forge.models.io import load_model_folder
    a = train(tiny(tmp_path / "a", data_cache, "train.micro_batch_size=2", "train.grad_accum=2",
                   "train.max_steps=5", "train.eval_interval=0"))
    b = train(tiny(tmp_path / "b", data_cache, "train.micro_batch_size=4", "train.grad_accum=1",
                   "train.max_steps=5", "train.eval_interval=0"))
    assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-6)
    assert a.grad_norms == pytest.approx(b.grad_norms, rel=1e-4)
    ma, _ = load_model_folder(str(tmp_path / "a/checkpoints/step_00000005/model"))
    mb, _ = load_model_folder(str(tmp_path / "b/checkpoints/step_00000005/model"))
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
def test_bf16_zero1_and_activation_checkpointing_run(tmp_path, data_cache):
    r = train(tiny(tmp_path / "bf16", data_cache, "train.precision=bf16", "parallel.zero_stage=1",
                   "train.max_steps=3", "train.eval_interval=3"))
    assert all(math.isfinite(x) for x in r.losses) and r.val_losses[0][0] == 3
    plain = train(tiny(tmp_path / "p", data_cache, "train.max_steps=3", "train.eval_interval=0"))
    ac = train(tiny(tmp_path / "ac", data_cache, "train.max_steps=3", "train.eval_interval=0",
                    "train.activation_checkpointing=full"))
    assert ac.losses == pytest.approx(plain.losses, rel=1e-6)


def test_vocab_size_from_tokenizer_or_explicit(tmp_path, data_cache):
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        train(tiny(tmp_path / "v1", data_cache, "model.vocab_size=50"), explicit_vocab=True)
    assert not (tmp_path / "v1" / "config.yaml").exists()
    r = train(tiny(tmp_path / "v2", data_cache, "model.vocab_size=96", "train.max_steps=1", "train.eval_interval=0"),
              explicit_vocab=True)
    assert r.config.model.vocab_size == 96


# ---------------------------------------------------------------- signals
class _SignalAfter:
    """A dataset wrapper that sends `signum` to this process after `n` samples were read."""

    def __init__(self, ds, n, signum):
        self.ds, self.n, self.signum, self.reads = ds, n, signum, 0
        self.seed = getattr(ds, "seed", 0)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.n:
            os.kill(os.getpid(), self.signum)
        return self.ds[i]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, data_cache):
    from forge.data import build_data
    cfg = tiny(tmp_path / "sig", data_cache, "train.max_steps=1000", "train.save_interval=0", "train.eval_interval=0")
    bundle = build_data(cfg.data, seed=cfg.train.seed)
    bundle.train = _SignalAfter(bundle.train, n=4 * 3 + 2, signum=signal.SIGTERM)   # during step 4
    old = signal.getsignal(signal.SIGTERM)
    r = train(cfg, data=bundle)
    assert signal.getsignal(signal.SIGTERM) == old                 # handler restored
    assert r.interrupted == signal.SIGTERM and r.step == 4
    assert r.checkpoint.endswith("step_00000004")
    assert os.path.isfile(os.path.join(r.checkpoint, "COMPLETE"))


# ---------------------------------------------------------------- CLI
def test_cli_bad_configs_are_clear_errors(tmp_path, capsys):
    from forge.train.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [d_model: 3\n")
    assert main([str(bad)]) == 2
    assert "does not parse" in capsys.readouterr().err
    assert main(["model.d_modle=64"]) == 2
    assert "d_modle" in capsys.readouterr().err
    assert main(["train.max_steps=lots"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["optim.min_lr=1.0", f"train.out_dir={tmp_path / 'z3'}"]) == 2
    assert "optim.min_lr" in capsys.readouterr().err
    assert main(["parallel.pp=2", f"train.out_dir={tmp_path / 'z3'}"]) == 2     # 2 stages, 1 process
    assert "parallel.pp" in capsys.readouterr().err
    assert not (tmp_path / "z3").exists()


@pytest.mark.slow
def test_cli_subprocess_runs_config_file(tmp_path, data_cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(open(os.path.join(REPO, "configs", "tiny_debug.yaml")).read())
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "forge", "train", str(cfg), f"train.out_dir={out}", "train.max_steps=4",
         f"data.cache_dir={data_cache}", "train.save_interval=2", "log.progress=false"],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert len([ln for ln in open(out / "metrics.jsonl") if '"loss"' in ln]) >= 1


def test_wandb_offline_without_key(tmp_path, data_cache, monkeypatch):
    calls = {}

    class Run:
        def log(self, d, step):
            calls.setdefault("steps", []).append(step)

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    train(tiny(tmp_path / "wb", data_cache, "log.wandb=true", "train.max_steps=2", "train.eval_interval=0"))
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "forge"
    assert calls["steps"] == [1, 2] and calls["finished"]


# ---------------------------------------------------------------- data integrity
def test_damaged_data_or_token_ids_beyond_vocab_are_data_errors(tmp_path):
    """Checked before the model is built: a flipped byte in a prepared shard (checksum) and token ids
    a bare Megatron prefix holds beyond the tokenizer's (and so the model's) vocabulary."""
    import numpy as np
    from forge.data.indexed import IndexedWriter
    from forge.data.prepare import prepare
    from forge.data.tokenizer import CharTokenizer
    (tmp_path / "d.txt").write_text("".join(f"line {i} of some text to train on\n" for i in range(200)))
    out = str(tmp_path / "prepared")
    prepare([str(tmp_path / "d.txt")], out, train_tokenizer="char", shard_size=2000)
    with open(os.path.join(out, "shard_00001.bin"), "r+b") as f:
        byte = f.read(11)[10]
        f.seek(10)
        f.write(bytes([byte ^ 1]))                          # another character id, same size
    args = ["data.dataset=indexed", "data.split=[1,0,0]", "train.eval_interval=0"]
    with pytest.raises(ConfigError, match="shard_00001.bin has sha256 .*re-run forge prepare .*: forge prepare "
                                          "--input"):
        train(tiny(tmp_path / "r1", str(tmp_path / "c1"), f"data.paths=[{out}]", *args))
    megatron = tmp_path / "megatron"
    vocab = CharTokenizer.train(["abcdefgh"]).save(str(megatron))
    w = IndexedWriter(str(megatron / "corpus"), np.uint16)
    for i in range(40):
        w.add(np.arange(i, i + 100) % 300)                      # ids up to 138
    w.finish()
    with pytest.raises(ConfigError, match=r"corpus.bin holds token ids 0..138, outside the model's vocabulary \[0, "):
        train(tiny(tmp_path / "r2", str(tmp_path / "c2"), f"data.paths=[{megatron / 'corpus'}]", *args))
    assert vocab and not (tmp_path / "r2" / "checkpoints").exists()
