"""Index arrays built once (by rank 0), saved as .npy beside the data, memory-mapped by everyone.

`cached_arrays(folder, key, build, rank)` names the files by a hash of `key` (everything the
arrays depend on). Rank 0 builds and writes `<hash>-<name>.npy` through temporary files and
renames, then writes `<hash>.done` last; other ranks poll for `<hash>.done`
(up to FORGE_DATA_WAIT_S seconds, default 3600). Later runs find `.done` and only mmap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Callable

import numpy as np

from forge.data.shards import write_json_atomic

log = logging.getLogger("forge.data")


def wait_for(path: str, what: str) -> None:
    """Block until `path` exists (written by rank 0), or raise after FORGE_DATA_WAIT_S seconds."""
    timeout = float(os.environ.get("FORGE_DATA_WAIT_S", 3600))
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f}s for rank 0 to build {what} ({path}); is the folder "
                               f"shared between ranks? (FORGE_DATA_WAIT_S sets the wait)")
        time.sleep(0.1)


def cached_arrays(folder: str, key: dict, build: Callable[[], dict], rank: int = 0) -> dict:
    """{name: read-only memmapped array}, built by `build()` on rank 0 if not cached yet."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    done = os.path.join(folder, f"{digest}.done")
    if not os.path.exists(done):
        if rank != 0:
            wait_for(done, f"data indices {key}")
        else:
            os.makedirs(folder, exist_ok=True)
            t0 = time.monotonic()
            arrays = build()
            for name, arr in arrays.items():
                tmp = os.path.join(folder, f"{digest}-{name}.tmp{os.getpid()}.npy")
                np.save(tmp, np.ascontiguousarray(arr))
                os.replace(tmp, os.path.join(folder, f"{digest}-{name}.npy"))
            write_json_atomic(done, {"key": key, "arrays": sorted(arrays)})
            log.info("built data indices %s in %.1fs", digest, time.monotonic() - t0)
    with open(done, encoding="utf-8") as f:
        names = json.load(f)["arrays"]
    return {n: np.load(os.path.join(folder, f"{digest}-{n}.npy"), mmap_mode="r") for n in names}
