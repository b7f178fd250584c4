"""A shard set: the folder `forge prepare` writes, read back as one sequence of documents.

Folder layout:

    manifest.json                 settings, tokenizer checksum, per-shard counts and checksums
    tokenizer.json, tokenizer_config.json
    shard_00000.bin / .idx, ...   Megatron MMIDIDX pairs (see forge.data.indexed)

`ShardSet(path)` accepts such a folder (its manifest must say `complete`) or a bare Megatron
prefix (`path.bin`/`path.idx`, tokenizer beside it). Documents are numbered globally, shard by
shard, so document d lives in shard s = searchsorted(doc_offsets, d, "right") - 1.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from forge.data.indexed import IndexedDataset
from forge.data.tokenizer import TOKENIZER_FILE, Tokenizer

MANIFEST = "manifest.json"
FORMAT = "forge-shards"


def write_json_atomic(path: str, obj) -> None:
    """Write-then-rename: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a forge shard manifest (format={manifest.get('format')!r})")
    return manifest


class ShardSet:
    """The documents of one prepared folder (or one prefix), memory-mapped."""

    def __init__(self, path: str):
        self.path = path.rstrip("/")
        manifest = read_manifest(self.path) if os.path.isdir(self.path) else None
        if manifest is not None:
            if not manifest.get("complete"):
                raise ValueError(f"{self.path}: preparation is incomplete ({len(manifest['shards'])} shards "
                                 f"so far); re-run the same forge prepare command to finish it")
            prefixes = [os.path.join(self.path, s["name"]) for s in manifest["shards"]]
            self.fingerprint = hashlib.sha256(json.dumps(
                [s["bin_sha256"] for s in manifest["shards"]]).encode()).hexdigest()
            self.tokenizer_path = os.path.join(self.path, TOKENIZER_FILE)
        elif os.path.exists(self.path + ".idx"):
            prefixes = [self.path]
            st = os.stat(self.path + ".bin")
            self.fingerprint = hashlib.sha256(
                f"{os.path.abspath(self.path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
            self.tokenizer_path = os.path.join(os.path.dirname(self.path) or ".", TOKENIZER_FILE)
        else:
            raise FileNotFoundError(f"{self.path}: neither a forge prepare folder (no {MANIFEST}) "
                                    f"nor a .bin/.idx prefix")
        self.manifest = manifest
        self.shards = [IndexedDataset(p) for p in prefixes]
        counts = [len(s) for s in self.shards]
        self.doc_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets[-1])

    def doc_lengths(self, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        """Token counts of documents [lo, hi) as int64."""
        hi = self.num_docs if hi is None else hi
        sizes = np.concatenate([s.sizes for s in self.shards]) if self.shards else np.zeros(0, np.int32)
        return sizes[lo:hi].astype(np.int64)

    def get(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        s = int(np.searchsorted(self.doc_offsets, doc, side="right")) - 1
        return self.shards[s].get(doc - int(self.doc_offsets[s]), offset, length)

    def tokenizer(self) -> Tokenizer:
        if not os.path.exists(self.tokenizer_path):
            raise FileNotFoundError(f"{self.path}: no tokenizer beside the data ({self.tokenizer_path})")
        return Tokenizer.load(self.tokenizer_path)
