"""Data integrity: damaged shards found (open, checksums, cached), repaired by re-running prepare;
empty and binary input refused; token ids beyond the vocabulary refused; ranks on different data."""
import json
import logging
import os
import shlex

import pytest

from forge.cli import main as forge_main
from forge.data import integrity
from forge.data.indexed import FormatError
from forge.data.integrity import (DataMismatchError, IntegrityError, check_same_data, data_fingerprint,
                                  describe_data, verify_shard_files, verify_shard_set)
from forge.data.prepare import main as prepare_main
from forge.data.shards import ShardSet
from forge.data.tokenizer import CharTokenizer
from test_data_indexed import patch_idx, read_mmidx, write_docs

# 26 tokens of "a" (+EOD) are cut over three 10-token shards; "" is skipped; the rest fill shards 3-5
DOCS = ["a" * 25, "", "b" * 5, "c" * 3, "d" * 12, "e" * 4]
HINT = "re-run forge prepare to rebuild the damaged shards (it keeps the good ones): "


@pytest.fixture
def prepared(tmp_path):
    """A folder prepared by the CLI; returns (folder, every sequence via the independent reader)."""
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tok = CharTokenizer.train(["abcde"]).save(str(tmp_path / "tok"))
    out = str(tmp_path / "out")
    assert prepare_main(["--input", str(src), "--output", out, "--tokenizer", tok, "--shard-size", "10"]) == 0
    return out, sequences(out)


def sequences(out):
    m = json.load(open(os.path.join(out, "manifest.json")))
    return [read_mmidx(os.path.join(out, s["name"]))["seqs"] for s in m["shards"]]


def stamps(out):
    return {f: (os.stat(os.path.join(out, f)).st_ino, os.stat(os.path.join(out, f)).st_mtime_ns)
            for f in sorted(os.listdir(out)) if f.startswith("shard_")}


def flip_byte(path, at=0):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def damage(out, how, k):
    p = os.path.join(out, f"shard_{k:05d}")
    if how == "delete_bin":
        os.remove(p + ".bin")
    elif how == "truncate_bin":
        os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 2)
    elif how == "negative_length":                          # the right file sizes, an impossible index
        ref = read_mmidx(p)
        patch_idx(p, lengths=[-ref["lengths"][0]] + ref["lengths"][1:])
    elif how == "flip_bin":                                 # same size, same structure: only a checksum sees it
        flip_byte(p + ".bin", 2)


@pytest.mark.parametrize("how,ks", [("delete_bin", [1]), ("truncate_bin", [2]), ("negative_length", [0]),
                                    ("flip_bin", [4]), ("delete_bin", [0, 5])])
def test_damaged_shard_is_named_and_rerunning_prepare_repairs_only_it(prepared, tmp_path, caplog, how, ks):
    out, original = prepared
    manifest = open(os.path.join(out, "manifest.json")).read()
    assert len(original) == 6 and original[1] == [[0] * 10]        # shard 1 is a middle piece of doc 0
    before = stamps(out)
    for k in ks:
        damage(out, how, k)
    name = f"shard_{ks[0]:05d}"
    if how == "flip_bin":                  # opens fine; the trainer's checksum check refuses it
        shards = ShardSet(out)
        shards.check_cache = str(tmp_path / "cache" / "shard_checks.json")
        with pytest.raises(IntegrityError, match=f"{name}.bin has sha256 .* but .*manifest.json lists") as e:
            integrity.verify_shard_set(shards)
    else:
        with pytest.raises((FormatError, FileNotFoundError), match=name) as e:
            ShardSet(out)
    assert HINT in str(e.value)
    argv = shlex.split(str(e.value).split(HINT)[1])
    assert argv[:2] == ["forge", "prepare"]
    caplog.set_level(logging.INFO, logger="forge.data")
    assert forge_main(argv[1:]) == 0
    for k in ks:
        assert f"shard shard_{k:05d} is damaged" in caplog.text and f"rebuilt shard shard_{k:05d}" in caplog.text
    after = stamps(out)
    rebuilt = {f for f in before if before[f] != after.get(f)}
    assert rebuilt == {f"shard_{k:05d}.{x}" for k in ks for x in ("bin", "idx")}
    assert sequences(out) == original
    assert open(os.path.join(out, "manifest.json")).read() == manifest
    assert verify_shard_files(out, json.loads(manifest)) == []
    caplog.clear()
    assert forge_main(argv[1:]) == 0 and "already complete (6 shards, all verified)" in caplog.text
    assert stamps(out) == after


def test_checksums_are_cached_by_size_and_mtime(prepared, tmp_path, monkeypatch):
    out, _ = prepared
    scanned = []
    real = integrity.scan_shard
    monkeypatch.setattr(integrity, "scan_shard", lambda p, d: scanned.append(os.path.basename(p)) or real(p, d))
    cache = str(tmp_path / "run" / "index_cache" / "shard_checks.json")

    def check():
        s = ShardSet(out)
        vocab = s.tokenizer().vocab_size
        s.check_cache = cache
        verify_shard_set(s, vocab)

    check()
    assert scanned == [f"shard_{k:05d}" for k in range(6)] and os.path.exists(cache)
    scanned.clear()
    check()
    assert scanned == []                                            # a restart re-hashes nothing
    p = os.path.join(out, "shard_00003.bin")
    st = os.stat(p)
    flip_byte(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(IntegrityError, match="shard_00003.bin has sha256"):
        check()
    assert scanned == ["shard_00003"]                                # only the changed file
    # documented limit: damage that keeps size and mtime passes a cached start, but prepare finds it
    flip_byte(p)                                                    # restore, cache the good state
    check()
    good = os.stat(p)
    flip_byte(p)
    os.utime(p, ns=(good.st_atime_ns, good.st_mtime_ns))
    scanned.clear()
    check()
    assert scanned == []
    assert [k for k, _ in verify_shard_files(out, json.load(open(os.path.join(out, "manifest.json"))))] == [3]


def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_shard(tmp_path):
    prefix = str(tmp_path / "megatron_00002")
    write_docs(prefix, [[1, 2, 3], [4, 499]], 500)                 # written for a 500-token vocabulary
    s = ShardSet(prefix)
    s.check_cache = str(tmp_path / "c.json")
    verify_shard_set(s, 500)
    with pytest.raises(IntegrityError, match=r"shard .*megatron_00002.bin holds token ids 1..499, outside "
                                             r"the model's vocabulary \[0, 400\)"):
        verify_shard_set(s, 400)                                    # from the cache: same answer
    assert len(json.load(open(tmp_path / "c.json"))) == 1


def test_empty_input_is_refused(tmp_path, capsys):
    tok = CharTokenizer.train(["abc"]).save(str(tmp_path / "tok"))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    for src in ("blank.txt", "empty.jsonl"):
        rc = forge_main(["prepare", "--input", str(tmp_path / src), "--output", str(tmp_path / f"o_{src}"),
                         "--tokenizer", tok])
        assert rc == 2
        assert "the input holds no text" in capsys.readouterr().err
        with pytest.raises(ValueError, match="incomplete"):
            ShardSet(str(tmp_path / f"o_{src}"))


@pytest.mark.parametrize("content", [os.urandom(8192), "some text\n".encode("utf-16"), b"\0" * 5000 + b"abc\n"])
def test_binary_input_is_refused(tmp_path, capsys, content):
    (tmp_path / "blob.txt").write_bytes(content)
    assert forge_main(["prepare", "--input", str(tmp_path / "blob.txt"), "--output", str(tmp_path / "o"),
                       "--train-tokenizer", "char"]) == 2
    assert f"{tmp_path / 'blob.txt'}: not text" in capsys.readouterr().err


def test_text_with_a_few_bad_bytes_is_still_text(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world\nbad \xff byte here\nand \x00 one nul\n" * 20)
    assert forge_main(["prepare", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "o"),
                       "--train-tokenizer", "char"]) == 0
    assert json.load(open(tmp_path / "o" / "manifest.json"))["totals"]["invalid_utf8"] == 20


# ---------------------------------------------------------------- the same data on every rank
def test_fingerprint_mismatch_names_ranks_and_shards(prepared):
    out, _ = prepared
    bundle = type("B", (), {"shard_sets": [ShardSet(out)], "settings": {"split": [1, 0, 0], "seed": 1}})()
    d0 = describe_data(bundle)
    assert len(d0["shards"]) == 6 and data_fingerprint(bundle) == data_fingerprint(d0)
    d1 = json.loads(json.dumps(d0))
    d1["shards"][os.path.join(out, "shard_00004")] = "0" * 64 + ":10"
    d2 = json.loads(json.dumps(d0))
    d2["settings"]["seed"] = 2
    world = [d0, d0, d1, d2]

    def fake_gather(rank):
        return lambda obj: [obj if r == rank else (data_fingerprint(world[r]) if isinstance(obj, str) else world[r])
                            for r in range(len(world))]

    for rank in range(4):                  # every rank raises the same error
        with pytest.raises(DataMismatchError, match=r"ranks \[2, 3\] read different data than rank 0") as e:
            check_same_data(world[rank], gather=fake_gather(rank))
        assert f"rank 2: shards differ: {os.path.join(out, 'shard_00004')}" in str(e.value)
        assert "rank 3: settings differ: ['seed']" in str(e.value)
    same = lambda obj: [obj, obj]
    assert check_same_data(bundle, gather=same) == data_fingerprint(d0)
    assert check_same_data(bundle) == data_fingerprint(d0)          # no process group: nothing to compare


def _two_ranks(rank, world, out, bad_shard):
    import torch.distributed as dist
    from forge.data import integrity
    from forge.data.integrity import DataMismatchError, IntegrityError, check_same_data, describe_data, verify_data
    from forge.data.shards import ShardSet
    shards = ShardSet(out)
    shards.check_cache = os.path.join(os.path.dirname(out), "cache", "shard_checks.json")
    bundle = type("B", (), {"shard_sets": [shards], "settings": {"seed": 1}})()
    # the shard checks: each shard scanned once, by rank j % 2; rank 0 writes the cache
    scanned, real = [], integrity.scan_shard
    integrity.scan_shard = lambda p, d: scanned.append(os.path.basename(p)) or real(p, d)
    verify_data(bundle, 100)
    assert scanned == [f"shard_{k:05d}" for k in range(rank, 6, 2)], scanned
    dist.barrier()
    scanned.clear()
    verify_data(bundle, 100)
    assert scanned == []                                            # all from rank 0's cache
    if rank == 0:                                                   # damage a shard rank 1 checks
        flip_byte(os.path.join(out, "shard_00003.bin"), 1)
        os.utime(os.path.join(out, "shard_00003.bin"), ns=(1, 1))
    dist.barrier()
    try:
        verify_data(bundle, 100)
    except IntegrityError as e:                                     # raised on both ranks
        assert "shard_00003.bin has sha256" in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: no error")
    assert scanned == (["shard_00003"] if rank == 1 else []), scanned
    # the same data on every rank
    assert check_same_data(bundle)                                  # equal data: passes on both
    d = describe_data(bundle)
    if rank == 1:
        d["shards"][bad_shard] = "f" * 64 + ":7"
    try:
        check_same_data(d)
    except DataMismatchError as e:
        assert "ranks [1] read different data" in str(e) and bad_shard in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: no error")


@pytest.mark.slow
def test_shard_checks_and_fingerprint_over_two_gloo_ranks(prepared):
    from distributed import run_distributed
    out, _ = prepared
    run_distributed(_two_ranks, 2, out, os.path.join(out, "shard_00002"))


def test_resume_after_a_crash_also_repairs_a_damaged_shard(tmp_path, monkeypatch):
    """One pass over the input both rebuilds a damaged listed shard and writes the missing ones."""
    from forge.data.prepare import prepare
    from test_data_prepare import crash_on_finish
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tok = CharTokenizer.train(["abcde"]).save(str(tmp_path / "tok"))
    clean = prepare([str(src)], str(tmp_path / "clean"), tokenizer=tok, shard_size=10)
    crash_on_finish(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], str(tmp_path / "o"), tokenizer=tok, shard_size=10)
    monkeypatch.undo()
    damage(str(tmp_path / "o"), "truncate_bin", 1)
    resumed = prepare([str(src)], str(tmp_path / "o"), tokenizer=tok, shard_size=10)
    assert resumed == clean
    assert sequences(str(tmp_path / "o")) == sequences(str(tmp_path / "clean"))


@pytest.mark.parametrize("tok_args", [["--train-tokenizer", "bpe", "--vocab-size", "300"],
                                      ["--train-tokenizer", "char", "--text-unit", "paragraph", "--strict"]])
def test_repair_command_reproduces_trained_tokenizer_settings(tmp_path, tok_args):
    """The hint's command re-uses the tokenizer the first run trained (settings must match exactly)."""
    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(f"paragraph {i}\nwith two lines of text number {i * 7}" for i in range(60)))
    out = str(tmp_path / "o")
    assert prepare_main(["--input", str(src), "--output", out, "--shard-size", "200", *tok_args]) == 0
    original = sequences(out)
    os.remove(os.path.join(out, "shard_00002.idx"))
    with pytest.raises(FileNotFoundError, match="shard_00002.idx does not exist") as e:
        ShardSet(out)
    assert forge_main(shlex.split(str(e.value).split(HINT)[1])[1:]) == 0
    assert sequences(out) == original
