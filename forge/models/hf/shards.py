"""Safetensors shards written tensor by tensor, as transformers' save_pretrained names and sizes
them (--max-shard-size): the header of each file from the declared tensors first, then each
tensor's bytes as it comes. Nothing is buffered."""
from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter

import torch

from forge.models.io import SAFETENSORS_DTYPES

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([KMGT]i?B)?", re.IGNORECASE)
_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def parse_size(size) -> int:
    """Bytes from a size as save_pretrained(max_shard_size=...) takes it: an int or digits (bytes),
    "5GB" / "500MB" / "100KB" (powers of ten: 1GB = 10**9, as transformers) or "2GiB" (powers of two)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.fullmatch(str(size).strip())
        if not m:
            raise ValueError(f"size {size!r} is not a number of bytes or a number with a unit "
                             f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB")
        n = int(float(m[1]) * _UNITS[m[2].upper()]) if m[2] else int(float(m[1]))
    if n <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return n


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def shard_layout(layout: list, max_bytes: int) -> list[list]:
    """[(name, shape, dtype)] in order, cut into shards of at most max_bytes: a shard is closed when
    the next tensor would take it past the limit, and a tensor larger than the limit gets a shard
    of its own (as transformers' save_pretrained, which keeps no order)."""
    shards, current, size = [], [], 0
    for entry in layout:
        n = _nbytes(*entry[1:])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
        if size > max_bytes:               # an oversized tensor, alone
            shards.append(current)
            current, size = [], 0
    return shards + [current] if current else shards


class _SafetensorsFile:
    """One safetensors file written tensor by tensor: the header (each tensor's name, dtype, shape
    and byte range) first, from the declared entries, then each tensor's bytes as it is added, in
    the declared order. Nothing is buffered."""

    def __init__(self, path: str, entries: list, metadata: dict | None = None):
        header, offset = ({"__metadata__": metadata} if metadata else {}), 0
        for name, shape, dtype in entries:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)          # the header is padded to 8 bytes, as safetensors pads it
        self.path, self.todo = path, list(reversed(entries))
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> bool:
        """Append `tensor` (it must be the next declared entry); True once the file is complete."""
        want = self.todo.pop()
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != (want[0], tuple(want[1]), want[2]):
            raise RuntimeError(f"{self.path}: expected tensor {want[0]!r} {tuple(want[1])} {want[2]} next, "
                               f"got {name!r} {got[1]} {got[2]}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self.f.write(flat.view(torch.uint8).numpy())
        if not self.todo:
            self.f.close()
        return not self.todo

    def close(self) -> None:
        self.f.close()


class HFShardWriter:
    """Hugging Face safetensors shards written as tensors arrive, in the order declared by `layout`
    ([(HF name, shape, dtype)]): at most max_bytes each (see shard_layout), named as transformers
    names them (model-00001-of-00003.safetensors, ...) with model.safetensors.index.json, or a
    single model.safetensors (no index) when everything fits in one. One file is open at a time.

        with HFShardWriter(folder, layout, parse_size("5GB")) as w:
            for name, tensor in tensors:
                w.add(name, tensor)
    """

    def __init__(self, folder: str, layout: list, max_bytes: int, metadata: dict | None = None):
        self.folder, self.metadata = folder, {"format": "pt"} if metadata is None else metadata
        self.shards = shard_layout(layout, max_bytes)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.weight_map = {e[0]: f for f, shard in zip(self.files, self.shards) for e in shard}
        self.total_size = sum(_nbytes(*e[1:]) for e in layout)
        self.total_parameters = sum(math.prod(e[1]) for e in layout)
        self.done, self.current = 0, None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.current is None:
            if self.done == len(self.shards):
                raise RuntimeError(f"{self.folder}: tensor {name!r} comes after every declared tensor")
            self.current = _SafetensorsFile(os.path.join(self.folder, self.files[self.done]),
                                            self.shards[self.done], self.metadata)
        if self.current.write(name, tensor):
            self.current, self.done = None, self.done + 1

    def finish(self) -> None:
        """Check every declared tensor was written; write the index when there are several shards."""
        if self.current is not None or self.done != len(self.shards):
            raise RuntimeError(f"{self.folder}: {len(self.shards) - self.done} shard(s) were not completed")
        if len(self.files) > 1:
            index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                     "weight_map": self.weight_map}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.finish()
        elif self.current is not None:
            self.current.close()


def _main_dtype(layout: list) -> torch.dtype:
    """The dtype holding most of the bytes (the config's `dtype` when no single dtype was asked for)."""
    size = Counter()
    for _, shape, dtype in layout:
        size[dtype] += _nbytes(shape, dtype)
    return size.most_common(1)[0][0]
