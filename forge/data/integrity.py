"""Data integrity: shard checksums and token ranges, verified once and cached; the same data on every rank.

* `scan_shard(prefix, dtype)` reads a shard once: sha256 of the .bin and the .idx, and the
  smallest and largest token id in the .bin (16 MiB blocks, O(size) numpy; ~0.3 s per 100 MB).
* `verify_shard_files(folder, manifest)` (used by `forge prepare` on an existing output) checks
  every listed shard for presence, sizes, structure (IndexedDataset) and checksums against the
  manifest, always re-hashing: it returns the damaged shards and why.
* `verify_data(bundle, vocab_size)` (called by the trainer after the vocabulary is known) checks
  every shard a run reads: its checksums against manifest.json (folders written by forge prepare)
  and that each token id lies in [0, vocab_size). Scan results are cached in a JSON file,
  `ShardSet.check_cache` = `<index cache folder>/shard_checks.json` (the folder of the run's
  sample-index cache: data.cache_dir, else beside the data if writable, else train.out_dir), keyed
  by the shard's path and its files' (size, mtime_ns): a restart re-hashes nothing unless a file
  changed. Damage that keeps both size and mtime is found by `forge prepare` (which always
  re-hashes), not by a cached training start. With several ranks each shard is scanned by one
  rank (round robin), results are all-gathered and every rank raises the same error.
* `data_fingerprint(bundle)` hashes what a run reads (each shard's manifest checksum and size,
  and the split/blend settings); `check_same_data(bundle)` all-gathers it over the default
  process group and raises, naming the ranks and the shards that differ.

Every problem is a ValueError subclass naming the shard and what to run (`forge train` turns it
into a config error, exit 2).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Optional

import numpy as np

from forge.data.indexed import FormatError, IndexedDataset
from forge.data.shards import MANIFEST, ShardSet, repair_hint
from forge.fsutil import write_json_atomic

log = logging.getLogger("forge.data")
BLOCK = 1 << 24


class IntegrityError(ValueError):
    """A shard whose bytes disagree with its manifest, or hold token ids the model cannot embed."""


class DataMismatchError(ValueError):
    """Ranks of one run would read different data."""


def scan_shard(prefix: str, dtype) -> dict:
    """{bin_sha256, idx_sha256, min_token, max_token} of `prefix.bin/.idx`, read once in blocks."""
    dtype = np.dtype(dtype)
    h, lo, hi = hashlib.sha256(), None, None
    buf = bytearray(BLOCK)                    # a multiple of every itemsize: blocks never split a token
    with open(prefix + ".bin", "rb", buffering=0) as f:
        while n := f.readinto(buf):
            view = memoryview(buf)[:n]
            h.update(view)
            tokens = np.frombuffer(view, dtype=dtype, count=n // dtype.itemsize)
            if len(tokens):
                a, b = int(tokens.min()), int(tokens.max())
                lo, hi = a if lo is None else min(lo, a), b if hi is None else max(hi, b)
    hi_idx = hashlib.sha256()
    with open(prefix + ".idx", "rb") as f:
        while chunk := f.read(BLOCK):
            hi_idx.update(chunk)
    return {"bin_sha256": h.hexdigest(), "idx_sha256": hi_idx.hexdigest(), "min_token": lo, "max_token": hi}


def _stamp(prefix: str) -> list:
    a, b = os.stat(prefix + ".bin"), os.stat(prefix + ".idx")
    return [a.st_size, a.st_mtime_ns, b.st_size, b.st_mtime_ns]


def _read_cache(path: Optional[str]) -> dict:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):            # a damaged cache is only a cache: rebuild it
        return {}


def _write_cache(path: Optional[str], cache: dict) -> None:
    """Best effort (read-only folders and concurrent ranks only cost a re-scan next time)."""
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {**_read_cache(path), **cache})
    except OSError as e:
        log.warning("could not write the shard check cache %s: %s", path, e)


def shard_stats(ds: IndexedDataset, cache: dict) -> dict:
    """scan_shard of an open shard, from `cache` when its files' (size, mtime) are unchanged."""
    key = os.path.abspath(ds.prefix)
    stamp = _stamp(ds.prefix)
    hit = cache.get(key)
    if hit is None or hit.get("stamp") != stamp:
        hit = cache[key] = {"stamp": stamp, **scan_shard(ds.prefix, ds.dtype)}
    return hit


def _problem(shards: ShardSet, k: int, st: dict, vocab_size: Optional[int]) -> Optional[str]:
    """Why shard k of `shards` (scanned as `st`) must not be trained on, or None."""
    ds = shards.shards[k]
    entry = shards.manifest["shards"][k] if shards.manifest else {}
    for ext in ("bin", "idx"):
        want = entry.get(f"{ext}_sha256")
        if want and st[f"{ext}_sha256"] != want:
            return (f"shard {ds.prefix}: {ds.prefix}.{ext} has sha256 {st[f'{ext}_sha256'][:16]}..., but "
                    f"{os.path.join(shards.path, MANIFEST)} lists {want[:16]}... (the file was damaged or "
                    f"replaced); {repair_hint(shards.path, shards.manifest)}")
    if vocab_size is not None and st["max_token"] is not None and (
            st["min_token"] < 0 or st["max_token"] >= vocab_size):
        return (f"shard {ds.prefix}.bin holds token ids {st['min_token']}..{st['max_token']}, outside the "
                f"model's vocabulary [0, {vocab_size}): the data was tokenized with another tokenizer than the "
                f"one beside it (if the ids are meant, set model.vocab_size >= {st['max_token'] + 1})")
    return None


def _check(sets: list, mine, vocab_size: Optional[int]) -> tuple[list, dict]:
    """Check the shards `mine` [(set number, shard number)]: ([(set, shard, problem)], new cache entries
    per set number). Cache hits cost a stat; misses a scan."""
    problems, fresh = [], {}
    caches = {}
    for si, k in mine:
        if si not in caches:
            caches[si] = _read_cache(sets[si].check_cache)
        key = os.path.abspath(sets[si].shards[k].prefix)
        old = caches[si].get(key)
        st = shard_stats(sets[si].shards[k], caches[si])
        if st is not old:
            fresh.setdefault(si, {})[key] = st
        why = _problem(sets[si], k, st, vocab_size)
        if why:
            problems.append((si, k, why))
    return problems, fresh


def verify_shard_set(shards: ShardSet, vocab_size: Optional[int] = None) -> None:
    """Each shard's checksums equal manifest.json's (when there is one) and, given `vocab_size`,
    its token ids lie in [0, vocab_size). Scans are cached in `shards.check_cache` (see module doc)."""
    problems, fresh = _check([shards], [(0, k) for k in range(len(shards.shards))], vocab_size)
    if fresh:
        _write_cache(shards.check_cache, fresh[0])
    if problems:
        raise IntegrityError(problems[0][2])


def _shard_sets(bundle) -> list:
    return list(getattr(bundle, "shard_sets", None) or [])


def verify_data(bundle, vocab_size: Optional[int] = None) -> None:
    """`verify_shard_set` for every shard set of a DataBundle (a bundle without them: nothing to do).

    With a process group of W > 1 ranks, shard j (counting over all sets) is checked by rank j % W
    only, the results are all-gathered, and every rank raises the same error (no rank is left
    waiting in a later collective); rank 0 writes the new cache entries. So a first start hashes
    each shard once, W ranks in parallel. On storage that is not shared, a rank trusts the others'
    hashes of their own copies (the manifests are compared by check_same_data, and every rank
    checks the structure of what it opens).
    """
    sets = _shard_sets(bundle)
    work = [(si, k) for si, s in enumerate(sets) for k in range(len(s.shards))]
    group = _default_group()
    rank, world = (group[1], group[2]) if group else (0, 1)
    problems, fresh = _check(sets, work[rank::world], vocab_size)
    if group:
        results = group[0]((problems, fresh))
        problems = sorted(p for r in results for p in r[0])
        fresh = {}
        for r in results:
            for si, entries in r[1].items():
                fresh.setdefault(si, {}).update(entries)
    if rank == 0:
        for si, entries in fresh.items():
            _write_cache(sets[si].check_cache, entries)
    if problems:
        more = f" (and {len(problems) - 1} more damaged shards)" if len(problems) > 1 else ""
        raise IntegrityError(problems[0][2] + more)


def verify_shard_files(folder: str, manifest: dict) -> list[tuple[int, str]]:
    """(shard number, why) for each shard listed in `manifest` whose files are missing, of the wrong
    size, malformed, or whose sha256 differs from the manifest's. Re-hashes every shard."""
    itemsize = np.dtype(manifest["settings"]["dtype"]).itemsize
    damaged = []
    for i, entry in enumerate(manifest["shards"]):
        prefix = os.path.join(folder, entry["name"])
        why = None
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.exists(prefix + ext)]
        if missing:
            why = f"{', '.join(map(os.path.basename, missing))} missing"
        elif os.path.getsize(prefix + ".bin") != entry["tokens"] * itemsize:
            why = f".bin has {os.path.getsize(prefix + '.bin')} bytes, not {entry['tokens'] * itemsize}"
        else:
            try:
                ds = IndexedDataset(prefix)
                if (len(ds), ds.num_tokens) != (entry["documents"], entry["tokens"]):
                    why = f".idx lists {len(ds)} sequences of {ds.num_tokens} tokens, not " \
                          f"{entry['documents']} of {entry['tokens']}"
                else:
                    st = scan_shard(prefix, ds.dtype)
                    bad = [ext for ext in ("bin", "idx") if st[f"{ext}_sha256"] != entry[f"{ext}_sha256"]]
                    if bad:
                        why = f"sha256 of .{' and .'.join(bad)} differs from the manifest"
            except (FormatError, FileNotFoundError) as e:
                why = str(e)
        if why:
            damaged.append((i, why))
    return damaged


# ------------------------------------------------------------------ the same data on every rank
def describe_data(bundle) -> dict:
    """What a run reads: {"settings": split/blend/seq_len/seed, "shards": {shard path: "sha256:size"}}."""
    shards = {}
    for s in _shard_sets(bundle):
        if s.manifest is not None:
            for e in s.manifest["shards"]:
                shards[os.path.join(s.path, e["name"])] = f"{e['bin_sha256']}:{e['tokens']}"
        else:
            for ds in s.shards:
                shards[ds.prefix] = f"size:{os.path.getsize(ds.prefix + '.bin')}:{os.path.getsize(ds.prefix + '.idx')}"
    return {"settings": dict(getattr(bundle, "settings", None) or {}), "shards": shards}


def data_fingerprint(bundle_or_description) -> str:
    d = bundle_or_description if isinstance(bundle_or_description, dict) else describe_data(bundle_or_description)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _default_group() -> Optional[tuple[Callable, int, int]]:
    """(gather, rank, world) over the default process group, when one of more than 1 rank is up."""
    try:
        import torch.distributed as dist
    except ImportError:                       # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def gather(obj):
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return gather, dist.get_rank(), dist.get_world_size()


def _default_gather() -> Optional[Callable]:
    group = _default_group()
    return group[0] if group else None


def check_same_data(bundle_or_description, gather: Optional[Callable] = None) -> str:
    """Raise DataMismatchError unless every rank reads the same data; return the fingerprint.

    `gather(obj)` returns every rank's obj in rank order (default: all_gather_object over the
    default process group when it is initialised with more than one rank; else nothing to compare).
    Every rank takes part and every rank raises the same error. Fingerprints are compared first;
    only when they differ are the descriptions gathered, to name the differing shards.
    """
    d = bundle_or_description if isinstance(bundle_or_description, dict) else describe_data(bundle_or_description)
    fp = data_fingerprint(d)
    gather = gather or _default_gather()
    if gather is None:
        return fp
    fps = gather(fp)
    if len(set(fps)) == 1:
        return fp
    descs = gather(d)
    ref = descs[0]
    lines = []
    for r, other in enumerate(descs):
        if fps[r] == fps[0]:
            continue
        diff = sorted(k for k in set(ref["shards"]) | set(other["shards"])
                      if ref["shards"].get(k) != other["shards"].get(k))
        sdiff = sorted(k for k in set(ref["settings"]) | set(other["settings"])
                       if ref["settings"].get(k) != other["settings"].get(k))
        shown = ", ".join(f"{k} ({ref['shards'].get(k, 'absent')} on rank 0, {other['shards'].get(k, 'absent')} "
                          f"on rank {r})" for k in diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
        lines.append(f"rank {r}: " + "; ".join(filter(None, [f"shards differ: {shown}" if diff else "",
                                                            f"settings differ: {sdiff}" if sdiff else ""])))
    bad = [r for r in range(len(fps)) if fps[r] != fps[0]]
    raise DataMismatchError(f"ranks {bad} read different data than rank 0 (fingerprint {fps[0][:12]}); "
                            + " | ".join(lines) + "; give every rank the same data folders (shared storage, "
                            "or identical copies from one forge prepare run)")
