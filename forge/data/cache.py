"""Index arrays built once (by rank 0), saved as .npy beside the data, memory-mapped by everyone.

`cached_arrays(folder, key, build, rank)` names the files by a hash of `key` (everything the
arrays depend on). Rank 0 writes `<hash>.building` (its host and pid), builds, writes
`<hash>-<name>.npy` through temporary files and renames, then writes `<hash>.done` last; other
ranks poll for `<hash>.done` for up to `wait_timeout()` seconds: train.collective_timeout_s
(`set_wait_timeout`, called by the trainer; 600 s otherwise), or FORGE_DATA_WAIT_S where set.
The error after that says whether rank 0 was seen building in the folder (the folder is shared:
is rank 0 alive, or does the build need a longer timeout?) or not (is the folder shared between
ranks? did rank 0 get there?). Later runs find `.done` and only mmap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from typing import Callable, Optional

import numpy as np

from forge.fsutil import atomic_file, write_json_atomic

log = logging.getLogger("forge.data")

DEFAULT_WAIT_S = 600.0          # train.collective_timeout_s's default
_wait_s: Optional[float] = None


def set_wait_timeout(seconds: Optional[float]) -> None:
    """How long ranks other than 0 wait for rank 0's files (None: the default)."""
    global _wait_s
    _wait_s = None if seconds is None else float(seconds)


def wait_timeout() -> float:
    env = os.environ.get("FORGE_DATA_WAIT_S")
    if env:
        return float(env)
    return DEFAULT_WAIT_S if _wait_s is None else _wait_s


def wait_for(path: str, what: str, started: Optional[str] = None) -> None:
    """Block until `path` exists (written by rank 0), or raise TimeoutError after `wait_timeout()`
    seconds with what to check. `started`: a file rank 0 writes when it begins (its host and pid)."""
    timeout = wait_timeout()
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(_wait_message(path, what, started, timeout))
        time.sleep(0.1)


def _wait_message(path: str, what: str, started: Optional[str], timeout: float) -> str:
    head = (f"{socket.gethostname()} waited {timeout:.0f}s for rank 0 to build {what}: {path} did not appear. ")
    tail = " (train.collective_timeout_s sets the wait; FORGE_DATA_WAIT_S overrides it)"
    if started and os.path.exists(started):
        try:
            with open(started, encoding="utf-8") as f:
                who = json.load(f)
            by = f"rank 0 (host {who.get('host')}, pid {who.get('pid')}) began building it {time.time() - who.get('time', 0):.0f}s ago"
        except (OSError, ValueError):
            by = "rank 0 began building it"
        return (head + f"{by}, so the folder is shared, but has not finished: is that process still alive (its log, "
                "a crash or the OOM killer)? A large dataset may need a longer wait." + tail)
    return (head + f"Rank 0 left no sign in {os.path.dirname(path) or '.'}: is that folder on a filesystem every rank "
            "shares (set data.cache_dir to a shared path, or give every node a copy of the cache built once)? Did "
            "rank 0 start and reach the data (its log)?" + tail)


def cached_arrays(folder: str, key: dict, build: Callable[[], dict], rank: int = 0) -> dict:
    """{name: read-only memmapped array}, built by `build()` on rank 0 if not cached yet."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    done = os.path.join(folder, f"{digest}.done")
    building = os.path.join(folder, f"{digest}.building")
    if not os.path.exists(done):
        if rank != 0:
            wait_for(done, f"data indices {key}", started=building)
        else:
            os.makedirs(folder, exist_ok=True)
            write_json_atomic(building, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
            t0 = time.monotonic()
            arrays = build()
            for name, arr in arrays.items():
                with atomic_file(os.path.join(folder, f"{digest}-{name}.npy"), mode=None, suffix=".npy") as tmp:
                    np.save(tmp, np.ascontiguousarray(arr))
            write_json_atomic(done, {"key": key, "arrays": sorted(arrays)})
            try:
                os.remove(building)
            except OSError:
                pass
            log.info("built data indices %s in %.1fs", digest, time.monotonic() - t0)
    with open(done, encoding="utf-8") as f:
        names = json.load(f)["arrays"]
    return {n: np.load(os.path.join(folder, f"{digest}-{n}.npy"), mmap_mode="r") for n in names}
