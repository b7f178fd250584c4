"""Checkpoints: exact resume, completion markers, and the runs that must refuse to start."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from forge.config import load_config
from forge.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, resolve_resume
from forge.train.cli import main as cli_main
from forge.train.trainer import train
from tests.helpers import snapshot, tiny_run_args


def tiny(out_dir, cache, *extra):
    return load_config(None, tiny_run_args(
        out_dir, cache, "model.dropout=0.1", "train.max_steps=8", "optim.lr=3e-3", "optim.warmup_steps=2",
        "train.log_interval=1", "train.eval_interval=3", "train.eval_steps=2", "train.save_interval=0", *extra))


@pytest.mark.parametrize("stage,grad_accum,precision", [                # ~10 s each: one in the fast tier
    pytest.param(0, 1, "fp32", marks=pytest.mark.slow), (1, 2, "fp32"),
    pytest.param(2, 1, "fp32", marks=pytest.mark.slow), pytest.param(0, 2, "bf16", marks=pytest.mark.slow),
    pytest.param(1, 1, "bf16", marks=pytest.mark.slow)])
def test_resume_is_bit_exact(tmp_path, data_cache, stage, grad_accum, precision):
    """Steps 1..8 uninterrupted == steps 1..4, stop, resume=auto, steps 5..8 (dropout on; bf16
    under autocast at ZeRO 0, DeepSpeed's bf16 optimizer at ZeRO 1)."""
    extra = (f"parallel.zero_stage={stage}", f"train.grad_accum={grad_accum}", f"train.precision={precision}")
    full = train(tiny(tmp_path / "full", data_cache, *extra))
    first = train(tiny(tmp_path / "split", data_cache, *extra), stop_at=4)
    assert first.checkpoint.endswith("step_00000004") and first.interrupted is None
    second = train(tiny(tmp_path / "split", data_cache, *extra, "train.resume=auto"))
    assert second.start_step == 4
    assert first.losses + second.losses == full.losses                  # bit for bit
    assert first.grad_norms + second.grad_norms == full.grad_norms
    assert first.val_losses + second.val_losses == full.val_losses
    # metrics.jsonl of the split run reads as one run
    split = [json.loads(x) for x in open(tmp_path / "split" / "metrics.jsonl")]
    whole = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]
    assert strip(split) == strip(whole)


@pytest.mark.slow
def test_resume_with_a_longer_schedule_continues(tmp_path, data_cache):
    """max_steps may change on resume (a warning, not an error); the step count carries on."""
    train(tiny(tmp_path / "r", data_cache, "train.max_steps=4"))
    r = train(tiny(tmp_path / "r", data_cache, "train.max_steps=6", "train.resume=auto"))
    assert r.start_step == 4 and r.step == 6 and len(r.losses) == 2
    again = train(tiny(tmp_path / "r", data_cache, "train.max_steps=6", "train.resume=auto"))
    assert again.step == 6 and again.losses == []                       # nothing left to do


def test_partial_checkpoint_is_never_picked(tmp_path, data_cache):
    out = tmp_path / "run"
    train(tiny(out, data_cache, "train.max_steps=4", "train.eval_interval=0"))
    good = out / "checkpoints" / "step_00000004"
    partial = out / "checkpoints" / "step_00000009"
    shutil.copytree(good, partial)
    os.remove(partial / "COMPLETE")                  # a crash between the files and the marker
    assert latest_checkpoint(str(out)) == str(good)
    assert [s for s, _ in list_checkpoints(str(out))] == [4]
    assert resolve_resume("auto", str(out)) == str(good)
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(partial), str(out))
    # resuming goes on from step 4; saving step 6 does not touch the partial 9
    r = train(tiny(out, data_cache, "train.max_steps=6", "train.eval_interval=0", "train.resume=auto"))
    assert r.start_step == 4 and r.checkpoint.endswith("step_00000006")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, data_cache):
    r = train(tiny(tmp_path / "new", data_cache, "train.max_steps=2", "train.eval_interval=0", "train.resume=auto"))
    assert r.start_step == 0 and r.step == 2


def test_missing_or_empty_resume_path_is_an_error(tmp_path, data_cache):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(tiny(tmp_path / "x", data_cache, f"train.resume={tmp_path / 'nope'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(tiny(tmp_path / "x", data_cache, f"train.resume={tmp_path / 'empty'}"))
    assert not (tmp_path / "x").exists()


def test_existing_run_is_never_overwritten(tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    train(tiny(out, data_cache, "train.max_steps=2", "train.eval_interval=0"))
    before = snapshot(out)
    # a fresh start into an out_dir with checkpoints
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(tiny(out, data_cache, "train.max_steps=2"))
    # another model resuming there
    with pytest.raises(CheckpointError, match="model.d_model"):
        train(tiny(out, data_cache, "model.d_model=64", "train.max_steps=4", "train.resume=auto"))
    # the same through the CLI: exit status 2 and a message
    assert cli_main(["model.d_model=64", "model.n_heads=4", "model.max_seq_len=32", "data.seq_len=32",
                     f"data.cache_dir={data_cache}", f"train.out_dir={out}", "train.resume=auto"]) == 2
    assert "different model" in capsys.readouterr().err
    assert snapshot(out) == before
