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
import shlex
from typing import Optional

import numpy as np

from forge.data.indexed import FormatError, IndexedDataset
from forge.data.tokenizer import TOKENIZER_FILE, Tokenizer

MANIFEST = "manifest.json"
FORMAT = "forge-shards"


def read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a forge shard manifest (format={manifest.get('format')!r})")
    return manifest


PREPARE_DTYPES = ("uint16", "int32")     # the token dtypes `forge prepare --dtype` accepts by name


def prepare_command(folder: str, manifest: dict) -> Optional[str]:
    """The `forge prepare` command line that reproduces (and so repairs) `folder`, from its manifest's
    settings; None for folders forge prepare did not write from files (e.g. the Shakespeare cache)."""
    s = manifest.get("settings", {})
    if "inputs" not in s or "tokenizer_source" not in s:
        return None
    argv = ["forge", "prepare", "--input", *[i["source"][3:] if i["source"].startswith("hf:") else i["source"]
                                             for i in s["inputs"]], "--output", os.path.abspath(folder)]
    src = s["tokenizer_source"]
    if src.startswith("train:"):
        _, kind, vocab = src.split(":")
        argv += ["--train-tokenizer", kind, "--vocab-size", vocab]
    else:
        argv += ["--tokenizer", src]
    argv += ["--text-key", s["text_key"], "--text-unit", s["unit"], "--shard-size", str(s["shard_size"])]
    if s.get("dtype") in PREPARE_DTYPES:
        argv += ["--dtype", s["dtype"]]
    if s.get("strict"):
        argv.append("--strict")
    cmd = shlex.join(argv)
    if not src.startswith("train:") and not os.path.isabs(src):
        cmd += f"  (from the folder the first run started in: the tokenizer path {src!r} is relative)"
    return cmd


def repair_hint(folder: str, manifest: Optional[dict]) -> str:
    """What to run to repair a damaged shard of `folder` (re-running prepare rebuilds only those)."""
    cmd = prepare_command(folder, manifest) if manifest else None
    if cmd:
        return f"re-run forge prepare to rebuild the damaged shards (it keeps the good ones): {cmd}"
    if manifest and manifest.get("settings", {}).get("source") == "shakespeare":
        root = os.path.dirname(os.path.abspath(folder))
        return f"delete {root} and start again: the Shakespeare shards are rebuilt when missing"
    return "re-create the .bin/.idx pair with the tool that wrote it"


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
        self.shards = []
        for i, p in enumerate(prefixes):
            try:
                ds = IndexedDataset(p)
                if manifest is not None:
                    entry = manifest["shards"][i]
                    if (len(ds), ds.num_tokens) != (entry["documents"], entry["tokens"]):
                        raise FormatError(f"shard {p}: {len(ds)} sequences of {ds.num_tokens} tokens, but "
                                          f"{MANIFEST} lists {entry['documents']} of {entry['tokens']}")
            except (FormatError, FileNotFoundError) as e:
                raise type(e)(f"{e}; {repair_hint(self.path, manifest)}") from None
            self.shards.append(ds)
        self.check_cache: Optional[str] = None      # JSON cache of forge.data.integrity (set by build_data)
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
