"""GPT pretraining samples: windows of seq_len + 1 tokens over shuffled, concatenated documents.

For the documents [lo, hi) of a shard set (one split), with L = seq_len:

    doc_idx     the documents in a seeded random order (rng = PCG64([seed, lo]))
    stream      their tokens concatenated in that order (each ends with EOD), T tokens
    sample j    stream[j*L : j*L + L + 1] for j < N = (T - 1) // L   (consecutive samples share
                one token: the last target of j is the first input of j+1; the tail is dropped)
    sample_idx  (N+1, 2): for each j, (position in doc_idx, offset) of stream token j*L
    shuffle_idx a seeded permutation of [0, N);  ds[i] = sample shuffle_idx[i]

The three arrays are built once by rank 0 and cached (forge.data.cache); the tokens stay in
the memory-mapped shards, so resident memory does not grow with the data.
"""
from __future__ import annotations

import numpy as np

from forge.data.cache import cached_arrays
from forge.data.shards import ShardSet

INDEX_VERSION = 1


def split_ranges(num_docs: int, fractions: list[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges for train/valid/test: boundaries round(cumsum(f)/sum(f) * D)."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) == 0 or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"data.split must be non-negative fractions with a positive sum, got {fractions}")
    bounds = np.concatenate([[0], np.round(np.cumsum(f) / f.sum() * num_docs)]).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def build_sample_index(lengths: np.ndarray, first_doc: int, seq_len: int, seed: int) -> dict:
    """doc_idx, sample_idx, shuffle_idx for documents first_doc + [0, len(lengths)); see module doc."""
    rng = np.random.default_rng([seed, first_doc])
    order = rng.permutation(len(lengths))
    cum = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64)[order], out=cum[1:])
    n = max(0, int(cum[-1] - 1) // seq_len)
    starts = np.arange(n + 1, dtype=np.int64) * seq_len
    pos = np.searchsorted(cum, starts, side="right") - 1
    return {"doc_idx": (first_doc + order).astype(np.int64),
            "sample_idx": np.stack([pos, starts - cum[pos]], axis=1).astype(np.int64),
            "shuffle_idx": rng.permutation(n).astype(np.int64)}


class GPTDataset:
    """`len(ds)` samples; `ds[i]` is an int64 array of seq_len + 1 tokens."""

    def __init__(self, shards: ShardSet, doc_range: tuple[int, int], seq_len: int, seed: int,
                 cache_folder: str, rank: int = 0, name: str = "train"):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shards, self.seq_len, self.seed, self.name = shards, seq_len, seed, name
        lo, hi = doc_range
        self.key = {"version": INDEX_VERSION, "data": shards.fingerprint, "docs": [lo, hi],
                    "seq_len": seq_len, "seed": seed}
        arrays = cached_arrays(cache_folder, self.key,
                               lambda: build_sample_index(shards.doc_lengths(lo, hi), lo, seq_len, seed), rank)
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
        self.num_docs = hi - lo

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def sample(self, j: int) -> np.ndarray:
        """Sample j in stream order (before shuffling)."""
        (p0, o0), (p1, o1) = self.sample_idx[j], self.sample_idx[j + 1]
        docs = self.doc_idx
        if p0 == p1:
            return self.shards.get(int(docs[p0]), int(o0), int(o1 - o0 + 1)).astype(np.int64)
        parts = [self.shards.get(int(docs[p0]), int(o0))]
        parts += [self.shards.get(int(docs[p])) for p in range(p0 + 1, p1)]
        parts.append(self.shards.get(int(docs[p1]), 0, int(o1 + 1)))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.name} dataset of {n} samples")
        return self.sample(int(self.shuffle_idx[i % n]))

    def describe(self) -> str:
        return f"{self.name}: {self.num_docs} documents, {len(self)} samples of {self.seq_len + 1} tokens"
