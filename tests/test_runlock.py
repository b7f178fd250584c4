"""The run-dir lock (forge.train.runlock): one run per train.out_dir, stale locks taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from forge.train.checkpoint import CheckpointError
from forge.train.cli import main as cli_main
from forge.train.runlock import LOCK_FILE, RunLockError, acquire, read_lock
from forge.train.trainer import train
from tests.distributed import run_distributed
from tests.helpers import tiny_run_args
from tests.test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(out, cache, *extra):
    return tiny_run_args(out, cache, "train.max_steps=2", "train.eval_interval=0", *extra)


def hold_lock_in_subprocess(out):
    """Another process that takes the lock on `out` and keeps it until killed."""
    code = ("import sys; from forge.train.runlock import acquire; lock = acquire(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, data_cache, capsys):
    """A live holder (another process): `forge train` there exits 2 naming it, and writes nothing.
    After the holder is SIGKILLed (its lock file stays behind) the next run takes the lock over
    with a warning, trains, and removes the lock at the end."""
    out = tmp_path / "run"
    holder = hold_lock_in_subprocess(out)
    try:
        held = read_lock(str(out))
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname()
        assert cli_main(tiny_args(out, data_cache)) == 2
        err = capsys.readouterr().err
        assert "in use by another training run" in err and f"pid {holder.pid}" in err
        assert sorted(os.listdir(out)) == [LOCK_FILE]             # no config.yaml, metrics.jsonl, checkpoints
        assert read_lock(str(out)) == held
    finally:
        holder.kill()
        holder.wait()
    assert read_lock(str(out))["pid"] == holder.pid            # a SIGKILLed holder leaves its file
    r = train(tiny(out, data_cache, "train.max_steps=2", "train.eval_interval=0"))
    assert r.step == 2
    err = capsys.readouterr().err
    assert "taking over the stale run lock" in err and f"pid {holder.pid}" in err
    assert not (out / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused(tmp_path, data_cache):
    out = tmp_path / "run"
    out.mkdir()
    other = {"pid": 4242, "host": "node-17.elsewhere", "started": "2026-01-02T03:04:05", "start_time": 1.0}
    (out / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(RunLockError) as e:
        train(tiny(out, data_cache, "train.max_steps=2"))
    msg = str(e.value)
    assert "node-17.elsewhere" in msg and "pid 4242" in msg and "2026-01-02T03:04:05" in msg
    assert f"delete {out / LOCK_FILE}" in msg
    assert sorted(os.listdir(out)) == [LOCK_FILE] and json.loads((out / LOCK_FILE).read_text()) == other


class _Probe:
    """A dataset wrapper that records the lock file's content at its first read and raises at read `fail_at`."""

    def __init__(self, ds, out, fail_at=None):
        self.ds, self.out, self.fail_at, self.reads, self.seen = ds, out, fail_at, 0, None
        self.seed = getattr(ds, "seed", 0)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        if self.seen is None:
            self.seen = read_lock(str(self.out))
        if self.reads == self.fail_at:
            raise RuntimeError("injected failure")
        return self.ds[i]


def test_lock_is_held_during_the_run_and_released_on_errors(tmp_path, data_cache):
    from forge.data import build_data
    out = tmp_path / "run"
    cfg = tiny(out, data_cache, "train.max_steps=3", "train.eval_interval=0")
    bundle = build_data(cfg.data, seed=cfg.train.seed)
    bundle.train = _Probe(bundle.train, out, fail_at=4 * 2 + 1)          # during step 3
    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg, data=bundle)
    assert bundle.train.seen["pid"] == os.getpid() and bundle.train.seen["host"] == socket.gethostname()
    assert not (out / LOCK_FILE).exists()
    # a refused start (a checkpoint problem found under the lock) releases it and leaves no empty dir behind
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(tiny(tmp_path / "x", data_cache, f"train.resume={tmp_path / 'nope'}"))
    assert not (tmp_path / "x").exists()


def test_acquire_is_exclusive_within_one_process_and_release_is_idempotent(tmp_path):
    lock = acquire(str(tmp_path / "d"))
    with pytest.raises(RunLockError, match="in use"):
        acquire(str(tmp_path / "d"))                                     # an independent open file
    lock.release()
    lock.release()
    with acquire(str(tmp_path / "d")):
        assert read_lock(str(tmp_path / "d"))["pid"] == os.getpid()
    assert not (tmp_path / "d" / LOCK_FILE).exists()


def _locked_run(rank, world, out, cache):
    with pytest.raises(RunLockError, match="in use by another training run"):
        train(tiny(out, cache, "train.max_steps=2", "train.eval_interval=0"))


@pytest.mark.slow
def test_every_rank_learns_that_the_dir_is_locked(tmp_path, data_cache):
    """Two ranks: rank 0 finds the lock held and every rank raises RunLockError (none waits)."""
    out = tmp_path / "run"
    with acquire(str(out)):
        run_distributed(_locked_run, 2, str(out), data_cache)
        assert sorted(os.listdir(out)) == [LOCK_FILE]


def test_without_flock_the_lock_file_decides(tmp_path, monkeypatch):
    """A file system without flock (ENOLCK): a live pid on this host refuses, a dead one is taken over."""
    import errno

    import forge.train.runlock as runlock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    d = tmp_path / "d"
    d.mkdir()
    (d / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    with pytest.raises(RunLockError, match=f"in use by another training run \\(pid {os.getppid()}"):
        acquire(str(d))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    warned = []
    with acquire(str(d), warn=warned.append):
        assert read_lock(str(d))["pid"] == os.getpid()
    assert len(warned) == 1 and f"pid {dead.pid}" in warned[0]
