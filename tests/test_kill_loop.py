"""kill -9 again and again while a run saves a checkpoint every step: each restart with
train.resume=auto continues from the newest complete checkpoint (taking over the dead run's lock),
and the final weights equal an uninterrupted run's bit for bit."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from forge.train.checkpoint import is_complete, list_checkpoints, step_dir
from tests.test_runlock import REPO, tiny_args

STEPS = 12


def _start(out, cache):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = tiny_args(out, cache, f"train.max_steps={STEPS}", "train.save_interval=1", "train.resume=auto")
    return subprocess.Popen([sys.executable, "-m", "forge", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _weights(out):
    model = os.path.join(step_dir(str(out), STEPS), "model")
    tensors = {}
    for name in sorted(os.listdir(model)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model, name)))
    return tensors


@pytest.mark.slow
def test_kill_9_during_saves_then_resume_equals_an_uninterrupted_run(tmp_path, data_cache):
    ref = _start(tmp_path / "ref", data_cache)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]

    out, rng, kills, pending_seen = tmp_path / "run", random.Random(0), 0, 0
    while kills < 4:
        proc = _start(out, data_cache)
        start = max([s for s, _ in list_checkpoints(str(out))], default=0)
        while proc.poll() is None and max([s for s, _ in list_checkpoints(str(out))], default=0) == start:
            time.sleep(0.01)              # until this run completed a checkpoint of its own
        if proc.poll() is not None:
            break                         # it finished first
        # kill as soon as a save is under way (a step dir without COMPLETE), else at a random moment
        ckdir, until = os.path.join(out, "checkpoints"), time.monotonic() + rng.uniform(0.05, 0.5)
        while time.monotonic() < until and not any(not is_complete(os.path.join(ckdir, d))
                                                   for d in os.listdir(ckdir) if d.startswith("step_")):
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        pending_seen += sum(not is_complete(os.path.join(ckdir, d)) for d in os.listdir(ckdir)
                            if d.startswith("step_"))
        assert list_checkpoints(str(out)), "a kill left no complete checkpoint to resume from"
    assert kills >= 2, "the run finished before it could be killed twice"
    assert pending_seen >= 1, "no kill landed inside a save"
    last = _start(out, data_cache)
    assert last.wait(timeout=300) == 0, last.stderr.read()[-2000:]

    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    print(f"{kills} kills, {pending_seen} incomplete step dirs seen right after them")
