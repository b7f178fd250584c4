"""Checkpoint retention (train.keep_last, train.keep_every): which step dirs remain, and that an
older checkpoint goes only after a newer one is complete."""
from __future__ import annotations

import os

import pytest

import forge.train.checkpoint as ckpt
from forge.train.trainer import train
from tests.test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def steps(out):
    d = os.path.join(out, "checkpoints")
    return sorted(int(n[5:]) for n in os.listdir(d) if n.startswith("step_"))


def test_keep_last_and_keep_every_leave_exactly_those_steps(tmp_path, data_cache, monkeypatch):
    """save_interval=1, 7 steps, keep_last=2, keep_every=3: steps 3, 6 (multiples) and 7 (the
    newest two: 6, 7) remain, all complete; each deletion happened while the newest checkpoint
    was complete already."""
    out = str(tmp_path / "run")
    real, seen = ckpt.prune_checkpoints, []

    def prune(out_dir, newest_step, keep_last, keep_every=0):
        newest = ckpt.step_dir(out_dir, newest_step)
        before = set(steps(out_dir))
        gone = real(out_dir, newest_step, keep_last, keep_every)
        seen.append((newest_step, ckpt.is_complete(newest), sorted(before - set(steps(out_dir)))))
        return gone
    monkeypatch.setattr(ckpt, "prune_checkpoints", prune)
    r = train(tiny(out, data_cache, "train.max_steps=7", "train.save_interval=1", "train.eval_interval=0",
                   "train.keep_last=2", "train.keep_every=3"))
    assert r.step == 7
    assert steps(out) == [3, 6, 7]
    assert all(ckpt.is_complete(ckpt.step_dir(out, s)) for s in (3, 6, 7))
    # step 1 goes when step 3 is complete (1, 2, 3 -> keep 2, 3), 2 when 4 is, 4 when 6 is, 5 when 7 is
    assert [(s, ok, gone) for s, ok, gone in seen if gone] == [(3, True, [1]), (4, True, [2]), (6, True, [4]),
                                                               (7, True, [5])]
    assert all(ok for _, ok, _ in seen)


def test_a_failed_save_deletes_nothing_and_the_resumed_checkpoint_stays(tmp_path, data_cache, monkeypatch):
    """keep_last=1: a run to step 4 keeps only step 4. Resumed from it, the save of step 5 dies
    between its files and its COMPLETE (a kill): step 4 is still there and complete, and resume
    picks it. The next resume saves 5 and 6 and then holds step 6 alone."""
    out = str(tmp_path / "run")
    keep = ("train.save_interval=1", "train.eval_interval=0", "train.keep_last=1")
    train(tiny(out, data_cache, "train.max_steps=4", *keep))
    assert steps(out) == [4]
    real = ckpt._fsync_tree

    def killed(path):
        if path.endswith("step_00000005"):
            raise KeyboardInterrupt("killed during the save of step 5")
        real(path)
    monkeypatch.setattr(ckpt, "_fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(out, data_cache, "train.max_steps=6", "train.resume=auto", *keep))
    assert steps(out) == [4, 5] and not ckpt.is_complete(ckpt.step_dir(out, 5))
    assert ckpt.resolve_resume("auto", out) == ckpt.step_dir(out, 4)
    monkeypatch.setattr(ckpt, "_fsync_tree", real)
    r = train(tiny(out, data_cache, "train.max_steps=6", "train.resume=auto", *keep))
    assert r.start_step == 4 and steps(out) == [6]
