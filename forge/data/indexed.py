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


CHECK_BLOCK = 1 << 22        # entries per numpy step of check_index: bounded temporaries on huge shards


def check_index(idx_path: str, sizes: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray,
                itemsize: int) -> int:
    """Check an index's arrays agree with each other; return the .bin size they describe.

    Invariants (each violation a FormatError naming `idx_path` and the first bad entry):
    every length >= 0; pointer[0] = 0 and pointer[i+1] = pointer[i] + length[i] * itemsize
    (sequences back to back, as Megatron writes them); doc_idx starts at 0, never decreases and
    ends at the number of sequences. Vectorised, O(n) in blocks of CHECK_BLOCK entries.
    """
    n = len(sizes)
    end = 0                                    # byte where the next sequence must start
    for lo in range(0, n, CHECK_BLOCK):
        s = sizes[lo:lo + CHECK_BLOCK].astype(np.int64)
        neg = np.flatnonzero(s < 0)
        if neg.size:
            i = lo + int(neg[0])
            raise FormatError(f"{idx_path}: sequence {i} has negative length {int(sizes[i])} "
                              f"({neg.size} negative lengths in entries {lo}..{lo + len(s) - 1})")
        starts = np.empty(len(s), dtype=np.int64)
        starts[0] = end
        np.cumsum(s[:-1] * itemsize, out=starts[1:])
        starts[1:] += end
        bad = np.flatnonzero(pointers[lo:lo + CHECK_BLOCK] != starts)
        if bad.size:
            i = lo + int(bad[0])
            raise FormatError(f"{idx_path}: sequence {i} starts at byte {int(pointers[i])}, but the lengths "
                              f"before it place it at byte {int(starts[bad[0]])} (pointers must be the "
                              f"cumulative byte sizes)")
        end = int(starts[-1]) + int(s[-1]) * itemsize
    if len(doc_idx) == 0 or doc_idx[0] != 0:
        raise FormatError(f"{idx_path}: the document index must start at 0, "
                          f"got {int(doc_idx[0]) if len(doc_idx) else 'no entries'}")
    if doc_idx[-1] != n:
        raise FormatError(f"{idx_path}: the document index ends at {int(doc_idx[-1])}, "
                          f"not at the number of sequences {n}")
    for lo in range(0, len(doc_idx) - 1, CHECK_BLOCK):
        d = doc_idx[lo:lo + CHECK_BLOCK + 1]
        down = np.flatnonzero(d[1:] < d[:-1])
        if down.size:
            i = lo + int(down[0]) + 1
            raise FormatError(f"{idx_path}: the document index decreases at entry {i} "
                              f"({int(doc_idx[i - 1])} -> {int(doc_idx[i])})")
    return end


class IndexedDataset:
    """Read-only view of one `prefix.bin`/`prefix.idx` pair; nothing is loaded, all is mmapped.

    `ds[i]` is sequence i (np.ndarray view of the .bin); `ds.get(i, offset, length)` a slice of it.
    Opening checks the header, the .idx size, `check_index` and that the .bin holds exactly the
    bytes the index describes, so a damaged pair fails here, naming its file, not mid-training.
    Token contents are not read (see forge.data.integrity for checksums and token ranges).
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
        need = check_index(idx_path, self.sizes, self.pointers, self.doc_idx, self.dtype.itemsize)
        bin_size = os.path.getsize(bin_path)
        if bin_size != need:
            raise FormatError(f"shard {prefix}: {bin_path} has {bin_size} bytes but {idx_path} describes "
                              f"{need} ({n_seq} sequences of {self.dtype.name}); the pair is truncated "
                              f"or mismatched")
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
