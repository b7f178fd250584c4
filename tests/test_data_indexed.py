"""The .bin/.idx format, checked against an independent reader written from Megatron's byte layout."""
import struct

import numpy as np
import pytest

from forge.data.indexed import FormatError, IndexedDataset, IndexedWriter, token_dtype

NP_OF_CODE = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def read_mmidx(prefix):
    """Independent reader: parses the .idx with struct, slices the .bin bytes by pointers."""
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", idx, 9)
    (code,) = struct.unpack_from("<B", idx, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", idx, 18)
    off = 34
    lengths = struct.unpack_from(f"<{n_seq}i", idx, off)
    off += 4 * n_seq
    pointers = struct.unpack_from(f"<{n_seq}q", idx, off)
    off += 8 * n_seq
    doc_idx = struct.unpack_from(f"<{n_doc}q", idx, off)
    assert off + 8 * n_doc == len(idx)
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    dt = np.dtype(NP_OF_CODE[code])
    seqs = [np.frombuffer(data[p:p + n * dt.itemsize], dtype=dt).tolist() for p, n in zip(pointers, lengths)]
    return {"version": version, "code": code, "lengths": list(lengths), "pointers": list(pointers),
            "doc_idx": list(doc_idx), "seqs": seqs, "bin_bytes": len(data)}


def write_docs(prefix, docs, vocab):
    w = IndexedWriter(prefix, token_dtype(vocab), vocab)
    for d in docs:
        w.add(np.array(d))
    return w.finish()


@pytest.mark.parametrize("vocab,code", [(300, 8), (65499, 8), (65500, 4), (200_000, 4)])
def test_writer_agrees_with_independent_reader(tmp_path, vocab, code):
    rng = np.random.default_rng(vocab)
    docs = [rng.integers(0, vocab, size=rng.integers(1, 50)).tolist() for _ in range(17)]
    info = write_docs(str(tmp_path / "s"), docs, vocab)
    ref = read_mmidx(str(tmp_path / "s"))
    assert ref["version"] == 1 and ref["code"] == code
    assert ref["seqs"] == docs
    assert ref["doc_idx"] == list(range(len(docs) + 1))
    assert ref["bin_bytes"] == sum(map(len, docs)) * (2 if code == 8 else 4)
    assert info["documents"] == len(docs) and info["tokens"] == sum(map(len, docs))
    ds = IndexedDataset(str(tmp_path / "s"))
    assert len(ds) == len(docs) and ds.num_tokens == info["tokens"]
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.sizes.tolist() == ref["lengths"] and ds.pointers.tolist() == ref["pointers"]
    assert ds.get(3, 1, 2).tolist() == docs[3][1:3]


def test_token_dtype_rule_and_refusal():
    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32
    assert token_dtype(1000, "int32") == np.int32
    with pytest.raises(ValueError, match="does not fit the token dtype uint16"):
        token_dtype(70000, "uint16")


def test_writer_refuses_ids_outside_vocab(tmp_path):
    w = IndexedWriter(str(tmp_path / "s"), np.uint16, vocab_size=10)
    with pytest.raises(ValueError, match="token id 10 outside"):
        w.add(np.array([1, 10]))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_unfinished_writer_leaves_no_shard(tmp_path):
    w = IndexedWriter(str(tmp_path / "s"), np.uint16)
    w.add(np.arange(5))
    assert not (tmp_path / "s.bin").exists() and not (tmp_path / "s.idx").exists()


@pytest.mark.parametrize("delta", [-2, 2])
def test_bin_length_disagreeing_with_idx_is_refused(tmp_path, delta):
    prefix = str(tmp_path / "shard_00007")
    write_docs(prefix, [[1, 2, 3], [4, 5]], 100)
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:delta] if delta < 0 else data + b"\0" * delta)
    with pytest.raises(FormatError, match="shard .*shard_00007.*has %d bytes" % (len(data) + delta)):
        IndexedDataset(prefix)


def test_bad_magic_and_truncated_index(tmp_path):
    prefix = str(tmp_path / "s")
    write_docs(prefix, [[1, 2, 3]], 100)
    idx = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(b"XXIDIDX\x00\x00" + idx[9:])
    with pytest.raises(FormatError, match="bad magic"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(idx[:-8])
    with pytest.raises(FormatError, match="header describes"):
        IndexedDataset(prefix)


def patch_idx(prefix, lengths=None, pointers=None, doc_idx=None):
    """Overwrite arrays of an .idx in place (same file size), at the offsets of Megatron's byte layout."""
    with open(prefix + ".idx", "r+b") as f:
        idx = f.read()
        n_seq, n_doc = struct.unpack_from("<QQ", idx, 18)
        for values, off, fmt, n in ((lengths, 34, "i", n_seq), (pointers, 34 + 4 * n_seq, "q", n_seq),
                                    (doc_idx, 34 + 12 * n_seq, "q", n_doc)):
            if values is not None:
                assert len(values) == n
                f.seek(off)
                f.write(struct.pack(f"<{n}{fmt}", *values))


@pytest.mark.parametrize("field,values,message", [
    ("lengths", [3, -2, 4], "sequence 1 has negative length -2"),         # last pointer + length still fits
    ("pointers", [0, 8, 10], "sequence 1 starts at byte 8, but the lengths before it place it at byte 6"),
    ("pointers", [2, 6, 10], "sequence 0 starts at byte 2, but .* byte 0"),
    ("doc_idx", [1, 1, 2, 3], "the document index must start at 0, got 1"),
    ("doc_idx", [0, 2, 1, 3], "the document index decreases at entry 2 \\(2 -> 1\\)"),
    ("doc_idx", [0, 1, 2, 2], "the document index ends at 2, not at the number of sequences 3"),
])
def test_inconsistent_index_at_the_right_file_size_is_refused(tmp_path, field, values, message):
    prefix = str(tmp_path / "shard_00003")
    write_docs(prefix, [[1, 2, 3], [4, 5], [6, 7, 8, 9]], 100)      # uint16: pointers 0, 6, 10; .bin 18 bytes
    assert read_mmidx(prefix)["pointers"] == [0, 6, 10] and read_mmidx(prefix)["bin_bytes"] == 18
    size = (tmp_path / "shard_00003.idx").stat().st_size
    patch_idx(prefix, **{field: values})
    assert (tmp_path / "shard_00003.idx").stat().st_size == size
    with pytest.raises(FormatError, match=f"shard_00003.idx: {message}"):
        IndexedDataset(prefix)


def test_index_checks_span_blocks(tmp_path, monkeypatch):
    """The checks run block by block; a bad entry in a later block is still found (block = 4 entries)."""
    from forge.data import indexed
    monkeypatch.setattr(indexed, "CHECK_BLOCK", 4)
    prefix = str(tmp_path / "s")
    docs = [[i % 7] * (1 + i % 3) for i in range(11)]
    write_docs(prefix, docs, 100)
    assert [d.tolist() for d in IndexedDataset(prefix)] == docs          # block edges carry the offsets
    ref = read_mmidx(prefix)
    pointers = list(ref["pointers"])
    pointers[9] += 2
    patch_idx(prefix, pointers=pointers)
    with pytest.raises(FormatError, match="sequence 9 starts at byte"):
        IndexedDataset(prefix)
    patch_idx(prefix, pointers=ref["pointers"], doc_idx=[0, 1, 2, 3, 4, 5, 6, 7, 5, 9, 10, 11])
    with pytest.raises(FormatError, match="decreases at entry 8"):
        IndexedDataset(prefix)
