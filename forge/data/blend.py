"""Several datasets mixed by weight, with exact proportions and a fixed interleaving.

With normalized weights w_d, sample k of dataset d is due at time (k + 1/2) / w_d; the blend
is the `size` earliest-due samples in time order (ties: lower d first). Among the first n
samples dataset d then appears round(w_d * t) times for the time t reached, so every prefix
holds each dataset within about one sample of w_d * n (the tests bound it by 1.5). Sample k
of dataset d beyond len(d) wraps into d's later epochs (forge.data.permute), so small datasets
are repeated, reshuffled, as their weight demands. Default size: the datasets' total length.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from forge.data.cache import cached_arrays
from forge.data.permute import epoch_index


def blend_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each blended sample, its sample number within that dataset)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    ds, ks, ts = [], [], []
    for d, wd in enumerate(w):
        if wd > 0:
            k = np.arange(int(np.ceil(wd * size)) + 1, dtype=np.int64)
            ds.append(np.full(len(k), d, dtype=np.int16))
            ks.append(k)
            ts.append((k + 0.5) / wd)
    d, k = np.concatenate(ds), np.concatenate(ks)
    order = np.lexsort((d, np.concatenate(ts)))[:size]
    return d[order], k[order]


class BlendedDataset:
    """`ds[i]` = sample k_i of dataset d_i (see module doc); `seed` reshuffles later epochs."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int,
                 cache_folder: Optional[str] = None, rank: int = 0, size: Optional[int] = None,
                 name: str = "blend"):
        if len(weights) != len(datasets):
            raise ValueError(f"{len(weights)} blend weights for {len(datasets)} datasets")
        for i, (ds, w) in enumerate(zip(datasets, weights)):
            if w > 0 and len(ds) == 0:
                raise ValueError(f"blended dataset {i} ({getattr(ds, 'name', '?')}) has weight {w} but no samples")
        self.datasets, self.seed, self.name = list(datasets), seed, name
        self.weights = [float(w) for w in weights]
        size = sum(len(d) for d in datasets) if size is None else size
        build = lambda: dict(zip(("dataset_idx", "sample_idx"), blend_indices(self.weights, size)))
        if cache_folder is None:
            arrays = build()
        else:
            key = {"blend": [getattr(d, "key", len(d)) for d in datasets], "weights": self.weights, "size": size}
            arrays = cached_arrays(cache_folder, key, build, rank)
        self.dataset_idx, self.sample_idx = arrays["dataset_idx"], arrays["sample_idx"]
        self.seq_len = getattr(datasets[0], "seq_len", None)

    def __len__(self) -> int:
        return len(self.dataset_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        d, k = int(self.dataset_idx[i]), int(self.sample_idx[i])
        ds = self.datasets[d]
        return ds[int(epoch_index(k, len(ds), getattr(ds, "seed", self.seed))[0])]

    def describe(self) -> str:
        parts = ", ".join(f"{w:.3g} x {getattr(d, 'name', '?')}" for d, w in zip(self.datasets, self.weights))
        return f"{self.name}: {len(self)} samples blended from {parts}"
