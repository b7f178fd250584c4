"""An exclusive lock on a run directory (train.out_dir): one training run writes there at a time.

    OUT/.lock     JSON {"pid", "host", "started" (ISO time), "start_time" (epoch s), "argv"}

Invariant: while a run holds the lock, no other `forge train` on the same out_dir gets past its
start (it raises RunLockError before writing anything: no config.yaml, metrics.jsonl or
checkpoint). The holder keeps the file open with an exclusive fcntl.flock for its whole life, so
the kernel drops the lock the moment the process dies, however it dies (SIGKILL included); the
JSON content only says who holds it. Taking the lock:

    flock free, file empty or ours              taken (a crash before the JSON was written)
    flock free, JSON of a process on this host  that process is dead (a live one would hold the
                                                flock): taken over with a warning
    flock free, JSON of another host            refused: flock need not reach across hosts (NFS),
                                                so Forge cannot tell whether that run is alive;
                                                the message names host, pid, start time and how
                                                to remove the file if the run is truly dead
    flock held                                  refused, naming the holder

On a file system without flock (ENOLCK, e.g. NFS without a lock daemon) the JSON decides alone:
a holder on this host whose pid is alive refuses, a dead one is taken over; two runs starting at
the same instant could then both pass.

Release (`RunLock.release`, at the end of the run, also after exceptions and SIGINT/SIGTERM)
unlinks the file and then closes it. A process that opened the old file before the unlink could
then flock an unlinked inode; `acquire` therefore checks, after flock succeeded, that the path
still names the inode it locked, and starts again when not.

Under several processes rank 0 takes the lock and `acquire_for_run` broadcasts the outcome, so
every rank raises the same RunLockError (no rank waits for one that gave up).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from forge.config import ConfigError

LOCK_FILE = ".lock"


class RunLockError(ConfigError):
    """The run directory is locked by another run (or the lock cannot be taken)."""


def lock_path(out_dir: str) -> str:
    return os.path.join(out_dir, LOCK_FILE)


def read_lock(out_dir: str) -> Optional[dict]:
    """The holder's JSON, or None when there is no lock file or it holds no JSON object."""
    try:
        with open(lock_path(out_dir)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: Optional[dict]) -> str:
    if not info:
        return "a process that has not written its details yet"
    return f"pid {info.get('pid')} on host {info.get('host')!r}, started {info.get('started')}"


_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _in_use(out_dir: str, path: str) -> RunLockError:
    return RunLockError(
        f"train.out_dir={out_dir!r} is in use by another training run ({_describe(read_lock(out_dir))}; "
        f"lock file {path}); wait for it to finish or choose another train.out_dir (nothing was written)")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """A held lock: the open, flocked file. `release()` is idempotent."""

    def __init__(self, out_dir: str, fd: int, created_dir: bool, took_over: Optional[dict] = None):
        self.out_dir, self.fd, self.created_dir, self.took_over = out_dir, fd, created_dir, took_over

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(lock_path(self.out_dir))
        except FileNotFoundError:
            pass
        os.close(self.fd)                    # drops the flock
        self.fd = None
        if self.created_dir:                 # a run that stopped before writing anything leaves no empty dir
            try:
                os.rmdir(self.out_dir)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def acquire(out_dir: str, warn=None) -> RunLock:
    """Take the lock on `out_dir` (created if missing) or raise RunLockError (see module doc).
    `warn(msg)` is called when a stale lock of a dead process on this host is taken over."""
    out_dir = os.path.abspath(out_dir)
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise RunLockError(f"train.out_dir={out_dir!r} cannot be created: {e}") from None
    path, host = lock_path(out_dir), socket.gethostname()
    for _ in range(100):
        got = _open_and_flock(path, out_dir)
        if got is None:                      # released (unlinked) between our open and flock: again
            continue
        fd, flocked = got
        old = _read_holder(fd)
        if old and old.get("host") != host:
            os.close(fd)
            raise RunLockError(
                f"train.out_dir={out_dir!r} is locked by {_describe(old)} (lock file {path}); Forge cannot tell from "
                f"host {host!r} whether that run is still alive. If it is truly dead, delete {path} and start again")
        took_over = old if old and old.get("pid") != os.getpid() else None
        if took_over and not flocked and _alive(old.get("pid")):
            os.close(fd)
            raise _in_use(out_dir, path)
        if took_over and warn is not None:
            warn(f"taking over the stale run lock {path} of {_describe(old)}: that process is gone")
        _write_holder(fd, host)
        return RunLock(out_dir, fd, created, took_over)
    raise RunLockError(f"cannot take the run lock {path!r}: it keeps being replaced")   # pragma: no cover


def _open_and_flock(path: str, out_dir: str) -> Optional[tuple[int, bool]]:
    """Open (creating) the lock file and take its exclusive flock without waiting: (fd, flocked),
    flocked False on a file system without flock (then the JSON alone decides). None when the
    file was unlinked between open and flock (its holder released it): the caller tries again, so
    the fd returned is always that of the file now at `path`. RunLockError when another open
    file holds the flock (a live run) or the file cannot be opened or locked."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunLockError(f"cannot open the run lock {path!r}: {e}") from None
    flocked = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _NO_FLOCK:        # a file system without flock: judge by the JSON alone
            flocked = False
        else:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(f"cannot lock {path!r}: {e}") from None
            raise _in_use(out_dir, path) from None
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd, flocked


def _read_holder(fd: int) -> Optional[dict]:
    """What the last holder wrote into the lock file (a dict), or None: empty or not JSON."""
    with os.fdopen(os.dup(fd)) as f:
        try:
            old = json.loads(f.read() or "null")
        except ValueError:
            old = None
    return old if isinstance(old, dict) else None


def _write_holder(fd: int, host: str) -> None:
    """Replace the lock file's content by this process's JSON (pid, host, start time, argv),
    fsynced, so that a later run names the holder and can tell a stale lock from a live one."""
    now = time.time()
    info = {"pid": os.getpid(), "host": host, "started": datetime.datetime.fromtimestamp(now).astimezone()
            .isoformat(timespec="seconds"), "start_time": now, "argv": list(sys.argv)}
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def acquire_for_run(out_dir: str) -> Optional[RunLock]:
    """Rank 0 takes the lock; every rank learns the outcome (collective). Returns the lock on
    rank 0, None on the other ranks; raises RunLockError on every rank when rank 0 could not."""
    from forge.train import distributed as dist
    lock, error = None, None
    if dist.is_main():
        try:
            lock = acquire(out_dir, warn=lambda m: print(f"forge train: warning: {m}", file=sys.stderr, flush=True))
        except RunLockError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise RunLockError(error)
    return lock
