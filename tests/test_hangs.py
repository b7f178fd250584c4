"""No hangs: the step watchdog, collective timeouts, the data-index wait, and torchrun jobs in
which one rank stalls (all ranks end) or dies (the job restarts and continues bit for bit)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from forge.config import ConfigError, load_config
from tests.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


LOAD_WATCHDOG = f"""
import importlib.util
_spec = importlib.util.spec_from_file_location("watchdog", {os.path.join(REPO, "forge", "train", "watchdog.py")!r})
watchdog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(watchdog)          # the module alone: no torch import, a fast start
StepWatchdog, inject_fault = watchdog.StepWatchdog, watchdog.inject_fault
"""


LOAD_SIGNALS = f"""
import importlib.util
_spec = importlib.util.spec_from_file_location("signals", {os.path.join(REPO, "forge", "train", "signals.py")!r})
_signals = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_signals)          # the module alone: no torch import
SignalGuard = _signals.SignalGuard
"""


def run_python(code: str, timeout: float, **env):
    """Run `code` in a fresh interpreter; (returncode, stderr, seconds)."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", LOAD_WATCHDOG + textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO, **env))
    return p.returncode, p.stderr, time.monotonic() - t0


# ---------------------------------------------------------------- the watchdog alone (no torch)
def test_watchdog_fires_after_the_last_beat_with_every_stack(tmp_path):
    log = tmp_path / "w.log"
    code, err, _ = run_python(f"""
        import threading, time
        threading.Thread(target=lambda: time.sleep(60), name="helper", daemon=True).start()
        dog = StepWatchdog(2.0, first_timeout_s=6.0, log_path={str(log)!r}).start()
        time.sleep(3.0)                      # the first interval: longer than timeout_s, within first_timeout_s
        for step in range(1, 6):             # beats every 0.4 s keep it quiet (5x margin: a loaded machine)
            time.sleep(0.4)
            dog.beat(f"step {{step}}")
        def stalled_in_this_function():
            time.sleep(30)
        stalled_in_this_function()
        """, timeout=60)
    assert code == 124, err
    assert "nothing finished for 2 s after step 5" in err and "train.step_timeout_s=2" in err
    for text in (err, log.read_text()):
        assert "stalled_in_this_function" in text                  # the main thread's stack
        assert text.count("hread 0x") >= 3      # main, helper and the watchdog ("Current thread 0x...")


def test_watchdog_backstop_when_the_gil_is_held():
    """A stall inside C code holding the GIL: faulthandler's C thread dumps and exits (status 1)."""
    code, err, dt = run_python("""
        StepWatchdog(1.0, grace_s=1.0).start()
        inject_fault(1, 0)
        """, timeout=60, FORGE_FAULT="0:1:hold_gil")
    assert code == 1 and "Timeout (0:00:02)" in err and "inject_fault" in err, err
    assert dt < 30


def test_watchdog_sidecar_kills_a_stopped_rank():
    """A SIGSTOPped rank runs no thread; the sidecar process SIGKILLs it (timeout + 2 grace)."""
    code, err, dt = run_python("""
        import os, signal
        StepWatchdog(1.0, grace_s=1.0).start()
        os.kill(os.getpid(), signal.SIGSTOP)
        """, timeout=60)
    assert code == -9 and "forge watchdog (sidecar): rank 0" in err and "SIGKILL" in err, err
    assert dt < 30


def test_watchdog_off_and_config_checks(tmp_path):
    from forge.train.watchdog import StepWatchdog
    with StepWatchdog(0.0) as dog:                # 0 = off: no thread
        assert dog._thread is None
    with pytest.raises(ConfigError, match="train.step_timeout_s"):
        load_config(None, ["train.step_timeout_s=-1"])
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        load_config(None, ["train.collective_timeout_s=0"])
    cfg = load_config(None, [])
    assert cfg.train.collective_timeout_s == 600 and cfg.train.step_timeout_s == 1800
    assert cfg.train.first_step_timeout_s == 3600


# ---------------------------------------------------------------- SIGTERM / SIGINT while blocked
GUARDED = """
import os, signal, sys, time
guard = SignalGuard(timeout_s=float(sys.argv[1]), rank=3).__enter__()
r, w = os.pipe()
print("ready", flush=True)
def blocked_in_a_collective():
    os.read(r, 1)           # waits in C like gloo; the Python handler runs, then the read goes on
if sys.argv[2] == "block":
    blocked_in_a_collective()
while guard.signum is None:                # the step boundary: the flag is read and the stop agreed
    time.sleep(0.05)
guard.acknowledge()
time.sleep(2.5)                            # the save: longer than timeout_s, allowed once acknowledged
guard.__exit__()
print("saved", flush=True)
"""


def guarded(timeout_s: float, mode: str, *signals, gap: float = 0.5):
    """A process under SignalGuard(timeout_s) that blocks in os.read (mode "block") or reaches its
    step boundary ("step"); `signals` are sent 0.2 s apart once it is ready; (returncode, stdout,
    stderr, seconds from the first signal to the exit)."""
    p = subprocess.Popen([sys.executable, "-c", LOAD_SIGNALS + GUARDED, str(timeout_s), mode], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap)
        p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err, time.monotonic() - t0


def test_a_rank_blocked_when_sigterm_arrives_exits_after_stop_timeout_with_its_stacks():
    """torchrun ends a job whose worker died with SIGTERM to the others, which usually wait in a
    collective for the dead one: the Python handler cannot run there, the watcher thread ends the
    process train.stop_timeout_s later with 128 + 15 and the main thread's stack."""
    code, _, err, dt = guarded(1.5, "block", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert 1.4 < dt < 10, dt
    assert "rank 3" in err and "train.stop_timeout_s=1.5 s of SIGTERM" in err and "blocked_in_a_collective" in err


def test_a_second_signal_ends_a_blocked_rank_at_once():
    code, _, err, dt = guarded(60, "block", signal.SIGTERM, signal.SIGINT)
    assert code == 128 + signal.SIGINT and dt < 10, err
    assert "received SIGINT after SIGTERM" in err and "blocked_in_a_collective" in err


def test_an_acknowledged_stop_may_take_longer_than_stop_timeout():
    """Once every rank agreed to stop (the save follows), the watcher lets the save finish."""
    code, out, err, dt = guarded(1.0, "step", signal.SIGTERM)
    assert code == 0 and "saved" in out and dt > 2.5, (code, err)
    with pytest.raises(ConfigError, match="train.stop_timeout_s"):
        load_config(None, ["train.stop_timeout_s=-1"])


# ---------------------------------------------------------------- the data-index wait
def test_data_index_wait_uses_the_collective_timeout_and_says_what_to_check(tmp_path, monkeypatch):
    from forge.data import cache
    monkeypatch.delenv("FORGE_DATA_WAIT_S", raising=False)
    assert cache.wait_timeout() == cache.DEFAULT_WAIT_S == 600
    cache.set_wait_timeout(0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="shares") as e:         # nothing from rank 0: not shared?
            cache.cached_arrays(str(tmp_path), {"k": 1}, build=None, rank=1)
        assert time.monotonic() - t0 < 5 and str(tmp_path) in str(e.value)
        assert "train.collective_timeout_s" in str(e.value)
        # rank 0 is building (slowly): its marker says the folder is shared, so ask whether it lives
        release = threading.Event()
        rank0 = threading.Thread(target=cache.cached_arrays, args=(str(tmp_path / "c"), {"k": 1},
                                                                   lambda: release.wait(30) and {"a": [1, 2]}, 0))
        rank0.start()
        try:
            with pytest.raises(TimeoutError, match="began building it .* is that process still alive"):
                cache.cached_arrays(str(tmp_path / "c"), {"k": 1}, build=None, rank=1)
        finally:
            release.set()
            rank0.join()
        assert list(cache.cached_arrays(str(tmp_path / "c"), {"k": 1}, build=None, rank=1)["a"]) == [1, 2]
        assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".building")]
    finally:
        cache.set_wait_timeout(None)


# ---------------------------------------------------------------- collective timeouts
@pytest.mark.slow
def test_collective_timeout_bounds_world_and_later_groups(tmp_path):
    """init_distributed(timeout_s) bounds the world group and groups made after it (DeepSpeed's and
    Forge's come from new_group): rank 0 waits for rank 1, which sleeps, and gets an error in time."""
    port = free_port()
    script = f"""
        import json, os, sys, time
        import torch, torch.distributed as td
        from forge.train import distributed as dist
        dist.init_distributed(timeout_s=2.0)
        sub = td.new_group([0, 1])
        if dist.rank() == 1:
            time.sleep(12)
            sys.exit(0)
        out = {{}}
        for name, group in (("world", None), ("sub", sub)):
            t0 = time.monotonic()
            try:
                td.all_reduce(torch.ones(1), group=group)
                out[name] = None
            except Exception as e:
                out[name] = [time.monotonic() - t0, type(e).__name__, str(e)[:200]]
        json.dump(out, open({str(tmp_path / 'r0.json')!r}, "w"))
        os._exit(0)
        """
    env = dict(os.environ, PYTHONPATH=REPO, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    env.pop("FORGE_DIST_OWNER", None)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    res = json.load(open(tmp_path / "r0.json"))
    for name in ("world", "sub"):
        assert res[name] is not None, (name, outs[0][-2000:])
        assert 1.5 < res[name][0] < 8, res           # timed out after ~2 s, not gloo's 30 min default


# ---------------------------------------------------------------- torchrun jobs
class Job:
    """A torchrun process whose output lines are collected with their arrival times."""

    def __init__(self, args: list[str], env: dict, cwd: str):
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the job hung:\n" + self.text[-4000:])
        self.ended = time.monotonic()
        self.reader.join(10)
        return self.proc.returncode

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def when(self, fragment: str) -> float:
        return next(t for t, line in self.lines if fragment in line)


def job_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FORGE_DIST_OWNER", "FORGE_FAULT"):
        env.pop(k, None)
    env.update(extra)
    return env


def train_args(cache, out, *extra) -> list[str]:
    return ["-m", "forge", "train", "model.preset=tiny-llama", "model.max_seq_len=32", "data.seq_len=32",
            f"data.cache_dir={cache}", "train.micro_batch_size=2", "train.eval_interval=0", "train.log_interval=1",
            f"train.out_dir={out}", "log.progress=false", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from forge.data import build_data
    folder = str(tmp_path_factory.mktemp("hangs_data"))
    cfg = load_config(None, ["data.seq_len=32", "model.max_seq_len=32", f"data.cache_dir={folder}"])
    build_data(cfg.data, seed=cfg.train.seed, work_dir=folder, rank=0, world_size=1)
    return folder


STEP_TIMEOUT = 5


@pytest.mark.slow
@pytest.mark.parametrize("action", ["sleep", "stop"])
def test_a_stalled_rank_ends_the_two_node_job_with_stacks(tmp_path, cache, action):
    """Two torchrun node ranks on loopback; rank 1 stalls after step 2: its main thread sleeps, or
    the whole process is stopped (SIGSTOP, the case that hung the job past 150 s). Rank 0's
    watchdog fires STEP_TIMEOUT s later (it waits in an all-reduce), dumps its stacks and exits 124;
    rank 1's does the same (sleep) or its sidecar SIGKILLs it 10 s later (stop); both launchers
    exit non-zero."""
    port, out = free_port(), tmp_path / "run"
    args = train_args(cache, out, "train.max_steps=1000", "train.save_interval=0",
                      f"train.step_timeout_s={STEP_TIMEOUT}", "train.first_step_timeout_s=300")
    jobs = [Job(["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "hangs", *args],
                job_env(FORGE_FAULT=f"1:2:{action}"), str(tmp_path)) for node in (0, 1)]
    codes = [job.wait(300) for job in jobs]
    text = jobs[0].text + jobs[1].text
    assert codes[0] != 0 and codes[1] != 0, text[-4000:]
    stalled = jobs[1].when(f"FORGE_FAULT=1:2:{action}")
    fired = jobs[0].when("forge watchdog: rank 0") - stalled
    took = [job.ended - stalled for job in jobs]
    print(f"{action}: rank 0's watchdog fired {fired:.1f} s after rank 1 stalled; the launchers ended after "
          f"{took[0]:.1f} s and {took[1]:.1f} s (train.step_timeout_s={STEP_TIMEOUT})")
    assert STEP_TIMEOUT - 1 < fired < STEP_TIMEOUT + 15 and max(took) < STEP_TIMEOUT + 45, text[-4000:]
    ranks = [(0, "all_reduce"), (1, "inject_fault")] if action == "sleep" else [(0, "all_reduce")]
    for rank, where in ranks:           # the waiting rank's stack; the stalled one's
        log = (out / f"watchdog_rank{rank}.log").read_text()
        assert f"forge watchdog: rank {rank}" in log and "after step 2" in log and where in log, log
        assert f"forge watchdog: rank {rank}" in text and where in text         # on the console too
    if action == "sleep":
        assert text.count("exitcode  : 124") == 2, text[-4000:]
    else:
        assert "exitcode  : 124" in text and "forge watchdog (sidecar): rank 1" in text, text[-4000:]


def losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_continues_bit_exact(tmp_path, cache):
    """torchrun --max-restarts 1 with train.resume=auto: rank 1 is SIGKILLed after step 3 (first
    attempt only); rank 0 ends (a failed collective, or torchrun's SIGTERM and at most
    train.stop_timeout_s later), the job restarts from the step-2 checkpoint, its rank 0 takes the
    run lock over and it finishes with the losses of an uninterrupted run bit for bit. The new
    attempt's process groups find no stale keys of the dead one in torchrun's shared store
    (forge.train.distributed.elastic_attempt_store), which made its gloo connectFullMesh fail."""
    common = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    args = ["train.max_steps=5", "train.save_interval=2", "train.resume=auto", "parallel.zero_stage=1",
            "train.stop_timeout_s=5"]
    plain = Job([*common, *train_args(cache, tmp_path / "plain", *args)], job_env(), str(tmp_path))
    assert plain.wait(400) == 0, plain.text[-4000:]
    killed = Job([*common, *train_args(cache, tmp_path / "killed", *args)],
                 job_env(FORGE_FAULT="1:3:kill", PYTHONUNBUFFERED="1"), str(tmp_path))
    assert killed.wait(400) == 0, killed.text[-4000:]
    text = killed.text
    assert "FORGE_FAULT=1:3:kill" in text and "resuming from" in text and "step_00000002" in text, text[-4000:]
    assert "Unable to shutdown process" not in text, text[-4000:]   # no rank waited for torchrun's SIGKILL
    assert not (tmp_path / "killed" / ".lock").exists()        # the restarted rank 0 took it and released it
    assert losses(tmp_path / "killed") == losses(tmp_path / "plain")
    assert [s for s, _ in losses(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    restarted = killed.when("resuming from") - killed.when("FORGE_FAULT=1:3:kill")
    print(f"restarted job: {killed.ended - killed.t0:.0f} s (the restart's first log line {restarted:.0f} s after the "
          f"kill); uninterrupted: {plain.ended - plain.t0:.0f} s")


@pytest.mark.slow
def test_a_rank_local_exception_ends_the_job_promptly(tmp_path, cache):
    """An exception on rank 1 alone (FORGE_FAULT=1:2:raise), no watchdog, a 300 s collective
    timeout: rank 1 writes its traceback and exits at once (forge.train.cli.exit_now), torchrun
    sees it and ends rank 0, which waits in a collective for it; the job fails within seconds."""
    args = train_args(cache, tmp_path / "run", "train.max_steps=1000", "train.save_interval=0",
                      "train.step_timeout_s=0", "train.collective_timeout_s=300")
    job = Job(["--standalone", "--nproc-per-node", "2", *args], job_env(FORGE_FAULT="1:2:raise", PYTHONUNBUFFERED="1"),
              str(tmp_path))
    assert job.wait(300) != 0, job.text[-4000:]
    text = job.text
    took = job.ended - job.when("FORGE_FAULT=1:2:raise")
    print(f"the job ended {took:.1f} s after rank 1 raised (train.collective_timeout_s=300)")
    assert "InjectedFault: FORGE_FAULT=1:2:raise" in text and "rank 1: failed; exiting now" in text, text[-4000:]
    assert took < 30, text[-4000:]
