"""Batches for data-parallel training, resumable from a consumed-samples count.

The global sample stream is s = 0, 1, 2, ...; stream position s reads dataset item
epoch_index(s, len(ds), ds.seed) (epoch 0 in dataset order, later epochs reshuffled, see
forge.data.permute). Global batch g covers stream positions [c + g*B*n, c + (g+1)*B*n) for
micro batch B, n data-parallel ranks and start c = consumed_samples; rank r takes the
contiguous B positions starting at c + g*B*n + r*B. Hence a run restarted with c = the
samples an uninterrupted run had consumed yields exactly that run's following batches.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from forge.data.permute import epoch_index


def batch_indices(n: int, seed: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                  consumed_samples: int = 0) -> Iterator[np.ndarray]:
    """Endless dataset indices of this rank's micro batches (see module doc)."""
    if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size or consumed_samples < 0:
        raise ValueError(f"bad batch layout: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                         f"dp_size={dp_size}, consumed_samples={consumed_samples}")
    if n <= 0:
        raise ValueError("cannot draw batches from an empty dataset")
    s = consumed_samples + dp_rank * micro_batch_size
    while True:
        yield epoch_index(np.arange(s, s + micro_batch_size), n, seed)
        s += micro_batch_size * dp_size


def dataset_indices(ds, idx) -> np.ndarray:
    """(len(idx),) int64: the dataset each of `ds`'s items idx comes from, its index in the list
    blended (data.paths order): a BlendedDataset's dataset_idx, 0 for a single dataset."""
    table = getattr(ds, "dataset_idx", None)
    idx = np.asarray(idx, dtype=np.int64)
    return np.zeros(len(idx), dtype=np.int64) if table is None else np.asarray(table[idx], dtype=np.int64)


def batch_iterator(ds, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                   consumed_samples: int = 0, with_dataset: bool = False):
    """Endless torch.LongTensor batches (micro_batch_size, seq_len + 1) for rank `dp_rank`; with
    `with_dataset` pairs (batch, dataset (micro_batch_size,)), each sample's dataset index
    (model.steering_datasets). The samples drawn are the same either way."""
    import torch
    for idx in batch_indices(len(ds), getattr(ds, "seed", 0), micro_batch_size, dp_rank, dp_size,
                             consumed_samples):
        batch = torch.from_numpy(np.stack([ds[int(i)] for i in idx]))
        yield (batch, torch.from_numpy(dataset_indices(ds, idx))) if with_dataset else batch
