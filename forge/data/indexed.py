"""Megatron's memory-mapped indexed dataset: a `.bin` of tokens and an `.idx` describing it.

`.idx` layout (little endian, Megatron-LM `MMIDIDX` version 1):

    offset  size        field
    0       9           magic b"MMIDIDX\\x00\\x00"
    9       8  uint64   version = 1
    17      1  uint8    dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                    7 float32, 8 uint16)
    18      8  uint64   S = number of sequences
    26      8  uint64   D = number of entries of doc_idx
    34      4*S int32   sequence lengths (tokens)
    ..      8*S int64   sequence pointers (byte offset of each sequence in .bin)
    ..      8*D int64   doc_idx: 0, then the sequence index where each document ends

`.bin` is the sequences' tokens back to back, so its size is pointer[-1] + length[-1] * itemsize.
Forge writes one sequence per document (doc_idx = 0, 1, ..., S), ending with the end-of-document
token; readers here accept any doc_idx but treat each sequence as a document.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
from typing import Optional

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
UINT16_VOCAB_LIMIT = 65500      # Megatron's rule: uint16 tokens when the vocabulary is below this


class FormatError(ValueError):
    """A .bin/.idx pair that is not a valid indexed dataset; the message names the file."""


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 below 65,500 token ids, else int32; a requested dtype must hold every id."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)
    dtype = np.dtype(requested)
    if dtype not in CODES or dtype.kind not in "iu":
        raise ValueError(f"token dtype {requested!r} is not one of uint8/int8/int16/int32/int64/uint16")
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit the token dtype {dtype.name} "
                         f"(max id {np.iinfo(dtype).max}); use --dtype int32 or auto")
    return dtype


def write_index(path: str, lengths: np.ndarray, dtype) -> None:
    """Write an .idx for sequences of `lengths` tokens stored back to back (one per document)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODES[np.dtype(dtype)], len(lengths), len(doc_idx)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())


class IndexedWriter:
    """Streams documents into `prefix.bin`/`prefix.idx`; `finish()` renames them into place.

    Until `finish()` both files exist only as `*.tmp`, so a crash never leaves a readable shard.
    """

    def __init__(self, prefix: str, dtype, vocab_size: Optional[int] = None):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self.limit = vocab_size if vocab_size is not None else np.iinfo(self.dtype).max + 1
        self.lengths: list[int] = []
        self.tokens = 0
        self._sha = hashlib.sha256()
        self._bin = open(prefix + ".bin.tmp", "wb")

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.limit):
            raise ValueError(f"{self.prefix}.bin: token id {int(tokens.max())} outside [0, {self.limit})")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._sha.update(data)
        self.lengths.append(len(tokens))
        self.tokens += len(tokens)

    def finish(self) -> dict:
        """Close, rename into place, and return {documents, tokens, bin_sha256, idx_sha256}."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self.prefix + ".idx.tmp", np.array(self.lengths, dtype=np.int64), self.dtype)
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")
        return {"documents": len(self.lengths), "tokens": self.tokens,
                "bin_sha256": self._sha.hexdigest(), "idx_sha256": file_sha256(self.prefix + ".idx")}

    def abort(self) -> None:
        self._bin.close()
        for ext in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.prefix + ext):
                os.remove(self.prefix + ext)


def file_sha256(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class IndexedDataset:
    """Read-only view of one `prefix.bin`/`prefix.idx` pair; nothing is loaded, all is mmapped.

    `ds[i]` is sequence i (np.ndarray view of the .bin); `ds.get(i, offset, length)` a slice of it.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"indexed dataset file {p} does not exist")
        idx_size = os.path.getsize(idx_path)
        if idx_size < HEADER.size:
            raise FormatError(f"{idx_path}: {idx_size} bytes is shorter than the {HEADER.size}-byte header")
        with open(idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise FormatError(f"{idx_path}: bad magic {magic!r} (expected {MAGIC!r}: not an MMIDIDX index)")
        if version != VERSION:
            raise FormatError(f"{idx_path}: index version {version} (only version {VERSION} is supported)")
        if code not in DTYPES:
            raise FormatError(f"{idx_path}: unknown dtype code {code}")
        expected = HEADER.size + 12 * n_seq + 8 * n_doc
        if idx_size != expected:
            raise FormatError(f"{idx_path}: {idx_size} bytes, but its header describes {expected} "
                              f"({n_seq} sequences, {n_doc} document entries)")
        self.dtype = np.dtype(DTYPES[code])
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        o = HEADER.size
        self.sizes = idx[o:o + 4 * n_seq].view("<i4")
        self.pointers = idx[o + 4 * n_seq:o + 12 * n_seq].view("<i8")
        self.doc_idx = idx[o + 12 * n_seq:expected].view("<i8")
        bin_size = os.path.getsize(bin_path)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        if bin_size != need:
            raise FormatError(f"shard {prefix}: {bin_path} has {bin_size} bytes but {idx_path} describes "
                              f"{need} ({n_seq} sequences of {self.dtype.name}); the pair is truncated "
                              f"or mismatched, re-run forge prepare")
        self.bin = np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_size else np.zeros(0, self.dtype)
        if bin_size and hasattr(mmap, "MADV_RANDOM"):
            # samples are read at random: no readahead or fault-around mapping 64 KiB per read
            self.bin._mmap.madvise(mmap.MADV_RANDOM)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sizes[i]) - offset if length is None else length
        return self.bin[start:start + n]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)
