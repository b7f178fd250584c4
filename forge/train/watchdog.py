"""Step watchdog: end a rank whose training stopped making progress, with every thread's stack.

    dog = StepWatchdog(timeout_s=1800, first_timeout_s=3600, rank=r, log_path=f"{out}/hang_rank{r}.log")
    dog.start()
    for step in ...:
        ...                      # a step, an evaluation, a checkpoint save
        dog.beat(f"step {step}")
    dog.stop()

A daemon thread checks that `beat()` is called at least every `timeout_s` seconds (the first
interval, which holds torch.compile and warm-up, gets `first_timeout_s`). When a deadline passes
it writes a line saying what stalled, the Python stack of every thread (faulthandler) to stderr
and to `log_path`, and ends the process with `os._exit(EXIT_CODE)`: a launcher (torchrun,
deepspeed, SLURM) sees a failed worker and tears the job down (or restarts it, torchrun
--max-restarts), instead of the other ranks waiting forever in a collective.

A rank stuck in C code that holds the GIL never lets that thread run; for it faulthandler's own
watchdog (a C thread, no GIL) is armed `grace_s` later (default max(5 s, timeout_s / 4)) and dumps
the stacks to stderr, then exits with status 1. A rank that is stopped (SIGSTOP, a frozen cgroup)
runs no thread at all, and its launcher sees a live worker and waits forever (torchrun does); for
it a sidecar process (`python -c`, no imports) that the beats reach through a pipe SIGKILLs the
rank 2 * grace_s after the deadline, with a line on stderr. It ends when the pipe closes, and
ignores SIGTERM/SIGINT/SIGHUP: torchrun tears a node down with a signal to the worker's process
group, which holds the sidecar too, and a stopped rank cannot act on that signal until it is killed.

`inject_fault(step, rank)` is a test hook: FORGE_FAULT="RANK:STEP:ACTION" makes rank RANK, after
step STEP, `kill` itself (SIGKILL), `stop` (SIGSTOP), `sleep` (its main thread sleeps, the GIL
free), `hold_gil` (sleeps in C holding the GIL) or `raise` (a Python exception on that rank alone,
InjectedFault); only in the first attempt of a torchrun job
(TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted job runs through.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

EXIT_CODE = 124          # the status a rank ends with when its watchdog fires (as `timeout(1)`)
FAULT_ENV = "FORGE_FAULT"


class StepWatchdog:
    def __init__(self, timeout_s: float, first_timeout_s: Optional[float] = None, *, rank: int = 0,
                 log_path: Optional[str] = None, grace_s: Optional[float] = None):
        self.timeout_s = float(timeout_s)
        self.first_timeout_s = float(first_timeout_s if first_timeout_s else timeout_s)
        self.grace_s = max(5.0, 0.25 * self.timeout_s) if grace_s is None else float(grace_s)
        self.rank, self.log_path = rank, log_path
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last, self._deadline, self._armed_for, self._beats = "start", 0.0, 0.0, 0
        self._stderr = sys.stderr
        self._sidecar: Optional[subprocess.Popen] = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> "StepWatchdog":
        if not self.enabled or self._thread is not None:
            return self
        self._stderr = _real_stderr()
        self._stop.clear()
        self._sidecar = _start_sidecar(self.rank, 2 * self.grace_s)
        self._arm(self.first_timeout_s)
        self._thread = threading.Thread(target=self._watch, name="forge-step-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, what: str) -> None:
        """Progress: `what` (e.g. "step 12") finished; the next must come within timeout_s."""
        if self._thread is None:
            return
        with self._lock:
            self._last, self._beats = what, self._beats + 1
            self._arm(self.timeout_s)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        faulthandler.cancel_dump_traceback_later()
        if self._sidecar is not None:
            try:
                self._sidecar.stdin.close()         # EOF: the sidecar exits
                self._sidecar.wait(5)
            except Exception:       # pragma: no cover
                self._sidecar.kill()
            self._sidecar = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- internals
    def _arm(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds
        self._armed_for = seconds
        # the backstop in C: fires only if this module's thread could not (GIL held)
        faulthandler.dump_traceback_later(seconds + self.grace_s, repeat=False,
                                          file=self._stderr, exit=True)
        if self._sidecar is not None:
            try:
                self._sidecar.stdin.write(f"{seconds}\n".encode())
                self._sidecar.stdin.flush()
            except OSError:         # the sidecar is gone: the other two still watch
                self._sidecar = None

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.timeout_s / 20))):
            with self._lock:
                late = time.monotonic() - self._deadline
                if late < 0:
                    continue
                last, armed = self._last, self._armed_for
            self._fire(last, armed)

    def _fire(self, last: str, armed: float) -> None:
        msg = (f"forge watchdog: rank {self.rank} (pid {os.getpid()}): nothing finished for {armed:.0f} s after "
               f"{last} (train.{'first_' if self._beats == 0 else ''}step_timeout_s={armed:g}); "
               f"the stack of every thread follows; exiting with status {EXIT_CODE} so the launcher ends the job. "
               "A rank that waits in a collective is usually waiting for another rank: look for the rank "
               "whose stack is not in a collective.\n")
        files = [self._stderr]
        try:
            if self.log_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
                files.append(open(self.log_path, "a"))
        except OSError:
            pass
        for f in files:
            try:
                f.write(msg)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.flush()
            except Exception:       # pragma: no cover - a closed stream must not stop the exit
                pass
        os._exit(EXIT_CODE)


_SIDECAR = r"""
import os, select, signal, sys, time
pid, rank, extra = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)           # a launcher's group kill must not end the sidecar first
fd, buf, deadline, armed = sys.stdin.fileno(), b"", None, 0.0
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([fd], [], [], wait)
    if ready:
        chunk = os.read(fd, 4096)
        if not chunk:
            sys.exit(0)                          # the rank closed the pipe or ended
        buf += chunk
        *lines, buf = buf.split(b"\n")
        if lines:
            armed = float(lines[-1])
            deadline = time.monotonic() + armed + extra
    elif deadline is not None:
        sys.stderr.write(f"forge watchdog (sidecar): rank {rank} (pid {pid}) made no progress for "
                         f"{armed + extra:.0f} s and did not end itself (stopped, or stuck without its "
                         f"threads running): sending SIGKILL\n")
        sys.stderr.flush()
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        sys.exit(0)
"""


def _start_sidecar(rank: int, extra_s: float) -> Optional[subprocess.Popen]:
    try:
        return subprocess.Popen([sys.executable, "-S", "-c", _SIDECAR, str(os.getpid()), str(rank), str(extra_s)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=_real_stderr(),
                                close_fds=True)
    except OSError:                 # pragma: no cover - no interpreter to start: the threads still watch
        return None


def _real_stderr():
    """sys.stderr if it is backed by a file descriptor (faulthandler writes to one), else the
    process's own stderr (pytest's capsys, notebooks)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__


class InjectedFault(RuntimeError):
    """The exception of FORGE_FAULT's `raise` action."""


def inject_fault(step: int, rank: int) -> None:
    """The FORGE_FAULT test hook (module doc); a no-op unless the variable names this rank and step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return
    r, s, action = spec.split(":")
    if int(r) != rank or int(s) != step:
        return
    print(f"forge: {FAULT_ENV}={spec}: rank {rank} {action} after step {step}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "sleep":
        while True:
            time.sleep(3600)
    elif action == "hold_gil":
        import ctypes
        ctypes.PyDLL(None).sleep(3600)          # a C call that keeps the GIL
    elif action == "raise":
        raise InjectedFault(f"{FAULT_ENV}={spec}: an exception on rank {rank} alone after step {step}")
    else:
        raise ValueError(f"{FAULT_ENV}={spec!r}: action must be kill, stop, sleep, hold_gil or raise")
