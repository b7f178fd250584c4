"""SIGINT / SIGTERM during training: a graceful stop at the next step boundary, or a prompt exit.

    with SignalGuard(timeout_s=cfg.train.stop_timeout_s, rank=r) as guard:
        for step in ...:
            ...                                  # the step
            stop = all_reduce_max(guard.signum or 0)
            if stop:
                guard.acknowledge()              # every rank agreed: the save may take its time
                save(step); break

The first signal sets `signum`; the loop reads it after the step, every rank agrees to stop, a
checkpoint is written and training returns. A rank that cannot get there must still end: the
usual case is torchrun tearing a job down (SIGTERM to every worker) after another worker died,
while this one waits in a collective for the dead peer. A Python signal handler runs only when the
main thread executes bytecode, never while it waits in C code; so the guard also gives the C-level
handler a wakeup pipe (`signal.set_wakeup_fd`) into which it writes the signal number at once, and
a watcher thread reads it. Unless the stop was acknowledged within `timeout_s` of the first signal,
or at once on a second signal (SIGINT or SIGTERM), the watcher writes a line and every thread's
stack to stderr and ends the process with `os._exit(128 + signal)`: no cleanup runs (a
checkpoint being written then has no COMPLETE marker, so it is never resumed from; the run lock
of a dead process is taken over by the next run), and the launcher sees the worker gone in time
(torchrun waits 30 s after its SIGTERM, then SIGKILLs).
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any, Optional


class SignalGuard:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, timeout_s: float = 0.0, rank: int = 0):
        self.timeout_s, self.rank = float(timeout_s), rank
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}
        self._old_wakeup = -1
        self._pipe: Optional[tuple[int, int]] = None
        self._thread: Optional[threading.Thread] = None
        self._acknowledged = threading.Event()
        self._closing = False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT and self._thread is None:
            raise KeyboardInterrupt            # a second Ctrl-C (no watcher): stop without saving
        if self.signum is None:
            self.signum = signum

    def acknowledge(self) -> None:
        """Every rank agreed to stop: the watcher lets the save that follows run to its end."""
        self._acknowledged.set()

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        r, w = os.pipe()
        os.set_blocking(w, False)              # the C handler must never block on a full pipe
        try:
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:                     # pragma: no cover - not the main thread of the main interpreter
            os.close(r)
            os.close(w)
            return self
        self._pipe = (r, w)
        self._thread = threading.Thread(target=self._watch, name="forge-signal-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._closing = True
            os.write(self._pipe[1], b"\0")     # wakes the watcher, which returns
            self._thread.join()
            self._thread = None
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    # ---------------------------------------------------------------- the watcher thread
    def _watch(self) -> None:
        import select
        fd, first, deadline = self._pipe[0], None, None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if self._closing:
                return
            if not ready:                                  # the first signal's deadline passed
                if not self._acknowledged.is_set():
                    self._exit(first, f"did not reach the end of its step within train.stop_timeout_s="
                                      f"{self.timeout_s:g} s of {signal.Signals(first).name}")
                deadline = None
                continue
            for signum in os.read(fd, 64):
                if signum not in self.SIGNALS:
                    continue
                if first is None:
                    first = signum
                    if self.timeout_s > 0:
                        deadline = time.monotonic() + self.timeout_s
                else:
                    self._exit(signum, f"received {signal.Signals(signum).name} after "
                                       f"{signal.Signals(first).name}")

    def _exit(self, signum: int, why: str) -> None:
        err = sys.__stderr__
        try:
            err.write(f"forge train: rank {self.rank} (pid {os.getpid()}) {why}: exiting with status "
                      f"{128 + signum} without saving; every thread's stack follows (a rank that waits in a "
                      "collective waits for another rank, often one that is gone)\n")
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
            err.flush()
        except Exception:       # pragma: no cover - a closed stream must not stop the exit
            pass
        os._exit(128 + signum)
