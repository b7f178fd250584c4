"""Non-finite steps (forge.train.nonfinite): skipped on every rank with the weights and the
optimizer state left bit-equal (read back from the checkpoints on disk), counted in
metrics.jsonl, a run stopped after train.max_skipped_steps of them in a row, no checkpoint with
non-finite values, a non-finite validation loss logged."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch

from forge.config import ConfigError, load_config
from forge.train.cli import main as cli_main
from forge.train.nonfinite import NonFiniteError
from forge.train.trainer import train
from tests.distributed import run_distributed
from tests.test_low_precision import fp16_on_cpu  # noqa: F401  (a fixture: fp16 paths on CPU tensors)
from tests.test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss with a non-finite norm)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class Inject:
    """Replaces forge's lm_loss (plain model and pipeline stages): training micro batch calls of
    step s (1-based, `grad_accum` calls per step) get `modes[s]` ("loss": the loss times NaN,
    "grad": infinite gradients, "spike": the loss times 100, "weight": one weight set to NaN
    first); with `eval_nan` evaluations at steps listed there return NaN."""

    def __init__(self, monkeypatch_or_none, modes, grad_accum=1, eval_nan=(), eval_every=None, engine_param=None):
        import forge.layout.pipeline as pipe
        import forge.models.transformer as tr
        self.real, self.modes, self.ga = tr.lm_loss, dict(modes), grad_accum
        self.calls, self.evals, self.eval_nan = 0, 0, set(eval_nan)
        self.weight = engine_param
        for mod in (tr, pipe):
            if monkeypatch_or_none is None:
                mod.lm_loss = self
            else:
                monkeypatch_or_none.setattr(mod, "lm_loss", self)

    def __call__(self, logits, targets, *args, **kwargs):
        loss = self.real(logits, targets, *args, **kwargs)
        if not torch.is_grad_enabled():
            self.evals += 1
            return loss * float("nan") if self.evals in self.eval_nan else loss
        self.calls += 1
        mode = self.modes.get((self.calls - 1) // self.ga + 1)
        if mode == "loss":
            return loss * float("nan")
        if mode == "grad":
            return _InfGrad.apply(loss)
        if mode == "spike":
            return loss * 100.0
        return loss


def tensors(ckpt, sub):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt, sub, "*.safetensors"))):
        out.update({f"{os.path.basename(f)}:{k}": v for k, v in load_file(f).items()})
    return out


def assert_bit_equal(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def step_dir(out, s):
    return os.path.join(out, "checkpoints", f"step_{s:08d}")


def state(out, s):
    return json.load(open(os.path.join(step_dir(out, s), "trainer_state.json")))


def metrics(out):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r}


@pytest.mark.parametrize("stage,precision,mode", [(0, "fp32", "loss"), (0, "bf16", "grad"), (1, "bf16", "loss"),
                                                  (2, "fp32", "grad"), (3, "bf16", "loss")])
def test_a_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, data_cache, monkeypatch, stage, precision, mode):
    """Step 3 has a NaN loss (or a finite loss with infinite gradients): checkpoints 2 and 3 hold
    bit-equal weights and optimizer state (Adam's step count 2 in both), step 4 trains again,
    the run finishes; metrics.jsonl says why step 3 was skipped."""
    out = str(tmp_path / "run")
    Inject(monkeypatch, {3: mode})
    r = train(tiny(out, data_cache, f"parallel.zero_stage={stage}", f"train.precision={precision}",
                   "train.max_steps=5", "train.save_interval=1", "train.eval_interval=0"))
    assert r.step == 5 and r.checkpoint.endswith("step_00000005")
    assert (mode == "loss") == math.isnan(r.losses[2])
    assert all(math.isfinite(x) for i, x in enumerate(r.losses) if i != 2)
    for sub in ("model", "optim"):
        assert_bit_equal(tensors(step_dir(out, 2), sub), tensors(step_dir(out, 3), sub))
    a, b = tensors(step_dir(out, 3), "optim"), tensors(step_dir(out, 4), "optim")
    assert all(not torch.equal(a[k], b[k]) for k in a)                # step 4 updates every moment (and master)
    assert [state(out, s)["optimizer_step"] for s in (2, 3, 4, 5)] == [2, 2, 3, 4]
    assert [state(out, s)["skipped_steps"] for s in (2, 3, 5)] == [0, 1, 1]
    m = metrics(out)
    assert m[3]["skipped"] == ("loss" if mode == "loss" else "grad_norm") and m[3]["skipped_in_a_row"] == 1
    assert m[3]["grad_norm"] is None and (m[3]["loss"] is None) == (mode == "loss")
    assert [m[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert "skipped" not in m[4]


@pytest.mark.parametrize("stage", [0, 1])
def test_fp16_overflows_are_the_loss_scalers_and_do_not_stop_the_run(tmp_path, data_cache, monkeypatch, fp16_on_cpu,
                                                                     stage):
    """fp16 (the GradScaler at ZeRO 0, DeepSpeed's fp16 optimizer at ZeRO 1): infinite gradients at
    steps 2 and 3 are loss-scale overflows (skipped, counted in skipped_steps, not in a row), a
    NaN loss at step 4 is a non-finite step; with train.max_skipped_steps=2 the run finishes, and
    checkpoints 1..4 hold the same weights and optimizer state."""
    out = str(tmp_path / "run")
    Inject(monkeypatch, {2: "grad", 3: "grad", 4: "loss"})
    r = train(tiny(out, data_cache, "train.precision=fp16", f"parallel.zero_stage={stage}", "train.max_steps=5",
                   "train.save_interval=1", "train.eval_interval=0", "train.max_skipped_steps=2"))
    assert r.step == 5
    m = metrics(out)
    assert [(m[s].get("skipped"), m[s].get("skipped_in_a_row")) for s in range(1, 6)] == [
        (None, None), ("overflow", 0), ("overflow", 0), ("loss", 1), (None, None)]
    assert m[5]["skipped_steps"] == 3
    for s in (2, 3, 4):
        for sub in ("model", "optim"):
            assert_bit_equal(tensors(step_dir(out, 1), sub), tensors(step_dir(out, s), sub))
    assert [state(out, s)["optimizer_step"] for s in range(1, 6)] == [1, 1, 1, 1, 2]


def test_resume_after_a_skipped_first_step_is_bit_exact(tmp_path, data_cache, monkeypatch):
    """Step 1 skipped (Adam has no state yet): its checkpoint holds zero moments and Adam step 0;
    steps 1..4 uninterrupted == steps 1..2, stop, resume, steps 3..4 (the lr schedule and Adam's
    step count follow the skip the same way in both)."""
    extra = ("train.max_steps=4", "train.save_interval=1", "train.eval_interval=0")
    inject = Inject(monkeypatch, {1: "loss"})
    full = train(tiny(tmp_path / "full", data_cache, *extra))
    inject.calls = 0
    first = train(tiny(tmp_path / "split", data_cache, *extra), stop_at=2)
    inject.modes = {}
    second = train(tiny(tmp_path / "split", data_cache, *extra, "train.resume=auto"))
    assert second.start_step == 2 and math.isnan(full.losses[0]) and math.isnan(first.losses[0])
    assert first.losses[1:] + second.losses == full.losses[1:]
    assert first.grad_norms[1:] + second.grad_norms == full.grad_norms[1:]
    out = str(tmp_path / "split")
    assert state(out, 1)["optimizer_step"] == 0 and state(out, 4)["skipped_steps"] == 1
    assert all(not t.any() for k, t in tensors(step_dir(out, 1), "optim").items() if "::exp_avg" in k)
    assert_bit_equal(tensors(step_dir(out, 4), "model"), tensors(step_dir(str(tmp_path / "full"), 4), "model"))


def test_max_skipped_steps_in_a_row_stop_the_run_without_a_checkpoint_of_them(tmp_path, data_cache, monkeypatch):
    """From step 3 on every loss is NaN; train.max_skipped_steps=3 stops the run at step 5 with
    NonFiniteError. Steps 3 and 4 were saved with the (finite, unchanged) weights of step 2; no
    step 5 exists; every checkpoint is complete and finite."""
    from forge.models.io import read_weights
    out = str(tmp_path / "run")
    Inject(monkeypatch, {s: "loss" for s in range(3, 20)})
    with pytest.raises(NonFiniteError, match="3 steps in a row skipped.*train.max_skipped_steps=3"):
        train(tiny(out, data_cache, "train.max_steps=10", "train.save_interval=1", "train.eval_interval=0",
                   "train.max_skipped_steps=3"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "latest", "step_00000001", "step_00000002", "step_00000003", "step_00000004"]
    for s in (1, 2, 3, 4):
        assert os.path.isfile(os.path.join(step_dir(out, s), "COMPLETE"))
        assert all(torch.isfinite(t).all() for t in read_weights(os.path.join(step_dir(out, s), "model")).values())
    m = metrics(out)
    assert [m[s].get("skipped_in_a_row") for s in (2, 3, 4, 5)] == [None, 1, 2, 3]
    assert m[5]["skipped_steps"] == 3
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_a_checkpoint_with_a_non_finite_weight_is_refused(tmp_path, data_cache, monkeypatch):
    """A NaN written into a weight during step 3: the step is skipped (NaN loss) and the save of
    step 3 is refused naming the tensor; step 2 stays the newest complete checkpoint."""
    out = str(tmp_path / "run")
    import forge.train.step as step_mod
    real, calls = step_mod.micro_loss, [0]

    def micro_loss(engine, batch):
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                engine.module.layers["1"].attn.wo.weight[0, 0] = float("nan")
        return real(engine, batch)
    monkeypatch.setattr(step_mod, "micro_loss", micro_loss)
    with pytest.raises(NonFiniteError, match="checkpoint step 3 not written.*layers.1.attn.wo.weight"):
        train(tiny(out, data_cache, "train.max_steps=5", "train.save_interval=1", "train.eval_interval=0"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000001", "step_00000002"]
    assert metrics(out)[3]["skipped"] == "loss"


def test_a_non_finite_validation_loss_is_logged_and_training_goes_on(tmp_path, data_cache, monkeypatch, capsys):
    out = str(tmp_path / "run")
    Inject(monkeypatch, {}, eval_nan={1})                    # the first micro batch of the first evaluation
    r = train(tiny(out, data_cache, "train.max_steps=8", "train.eval_interval=4", "train.save_interval=0"))
    assert r.step == 8 and math.isnan(r.val_losses[0][1]) and math.isfinite(r.val_losses[1][1])
    evals = [x for x in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "val_loss" in x]
    assert [(x["step"], x["val_loss"] is None, x["val_ppl"] is None) for x in evals] == [(4, True, True),
                                                                                           (8, False, False)]
    assert "validation loss is not finite" in capsys.readouterr().err


def test_cli_huge_lr_diverges_with_exit_3(tmp_path, data_cache, capsys):
    """The issue's run: optim.lr=1e6. It used to exit 0 with NaN weights in COMPLETE checkpoints."""
    out = tmp_path / "run"
    args = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "data.seq_len=32",
            f"data.cache_dir={data_cache}", "train.micro_batch_size=4", "train.max_steps=30", "optim.lr=1e6",
            "optim.warmup_steps=0", "optim.grad_clip=0", "train.eval_interval=0", "train.save_interval=5",
            "train.max_skipped_steps=2", f"train.out_dir={out}", "log.progress=false"]
    assert cli_main(args) == 3
    err = capsys.readouterr().err
    assert "training diverged" in err and "train.max_skipped_steps=2" in err
    from forge.models.io import read_weights
    for d in glob.glob(str(out / "checkpoints" / "step_*")):
        assert all(torch.isfinite(t).all() for t in read_weights(os.path.join(d, "model")).values())


def test_a_loss_spike_is_skipped_when_asked(tmp_path, data_cache, monkeypatch):
    out = str(tmp_path / "run")
    Inject(monkeypatch, {23: "spike"})
    r = train(tiny(out, data_cache, "train.max_steps=25", "train.save_interval=0", "train.eval_interval=0",
                   "train.log_interval=5", "train.spike_factor=3"))
    m = metrics(out)
    assert r.step == 25 and m[23]["skipped"] == "spike" and m[25]["skipped_steps"] == 1
    assert sorted(s for s in m if "skipped" in m[s]) == [23]


@pytest.mark.parametrize("override,key", [("train.max_skipped_steps=-1", "train.max_skipped_steps"),
                                          ("train.keep_last=-2", "train.keep_last"),
                                          ("train.keep_every=-3", "train.keep_every"),
                                          ("train.spike_factor=0.5", "train.spike_factor")])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def _pipeline_run(rank, world, out, cache, modes):
    Inject(None, modes, grad_accum=2)
    train(tiny(out, cache, "parallel.pp=2", "train.grad_accum=2", "train.micro_batch_size=2", "train.max_steps=4",
               "train.save_interval=1", "train.eval_interval=0", "optim.grad_clip=0"))


@pytest.mark.slow
def test_pipeline_stages_skip_together(tmp_path, data_cache):
    """pp=2 (fp32, ZeRO 0: torch AdamW under DeepSpeed's pipeline engine): a NaN loss at step 2 is
    seen on the last stage only and infinite gradients at step 3 on both; both stages skip both
    steps (their checkpoint shards 1, 2, 3 are bit-equal) and train again at step 4."""
    out = str(tmp_path / "pipe")
    run_distributed(_pipeline_run, 2, out, data_cache, {2: "loss", 3: "grad"})
    for sub in ("model", "optim"):
        assert_bit_equal(tensors(step_dir(out, 1), sub), tensors(step_dir(out, 2), sub))
        assert_bit_equal(tensors(step_dir(out, 2), sub), tensors(step_dir(out, 3), sub))
    a, b = tensors(step_dir(out, 3), "optim"), tensors(step_dir(out, 4), "optim")
    assert all(not torch.equal(a[k], b[k]) for k in a)
    m = metrics(out)
    assert [m[s].get("skipped") for s in (1, 2, 3, 4)] == [None, "loss", "grad_norm", None]
    assert [state(out, s)["optimizer_step"] for s in (1, 2, 3, 4)] == [1, 1, 1, 2]
