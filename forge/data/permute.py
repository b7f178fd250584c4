"""Epoch order without storing it: a keyed pseudo-random permutation of [0, n).

Sample s of an endless stream over a dataset of n samples is item `epoch_index(s, n, seed)`:
epoch e = s // n, position r = s % n; epoch 0 reads r unchanged (the dataset is already
shuffled), epoch e >= 1 reads P_e(r), where P_e is a 6-round Feistel network on b-bit integers
(2^b >= n, b even) keyed by (seed, e), restricted to [0, n) by cycle walking: apply P_e again
until the value falls below n. A Feistel network is a bijection of [0, 2^b) for any round
function, so cycle walking gives a bijection of [0, n); fewer than 4 steps on average since
2^b < 4n. O(1) memory whatever n, vectorized over numpy arrays.
"""
from __future__ import annotations

import numpy as np

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a well-scrambled 64-bit hash of uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, epoch: int) -> np.ndarray:
    base = np.array([seed & (2**64 - 1), epoch & (2**64 - 1)], dtype=np.uint64)
    k = _mix(_mix(base[:1] + _GOLD) ^ base[1:])
    return _mix(k + _GOLD * np.arange(1, ROUNDS + 1, dtype=np.uint64))


def permute(r: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """P_(seed, epoch)(r) for integer array r with values in [0, n)."""
    x = np.asarray(r, dtype=np.uint64).copy()
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    half = np.uint64((bits + 1) // 2)
    mask = (np.uint64(1) << half) - np.uint64(1)
    keys = _round_keys(seed, epoch)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> half, y & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << half) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def epoch_index(s, n: int, seed: int) -> np.ndarray:
    """Dataset index of stream positions `s` (int or array) over n items; see the module doc."""
    s = np.atleast_1d(np.asarray(s, dtype=np.int64))
    if n <= 0:
        raise ValueError("the dataset is empty")
    if (s < 0).any():
        raise ValueError("stream positions must be non-negative")
    epoch, r = np.divmod(s, n)
    out = r.copy()
    for e in np.unique(epoch[epoch > 0]):
        sel = epoch == e
        out[sel] = permute(r[sel], n, seed, int(e))
    return out
