"""GPT samples, splits, caching, ranks, resume, epochs, blending, and flat memory on ~1 GB."""
import json
import os

import numpy as np
import pytest

from forge.config import DataConfig
from forge.data import build_data, gpt_dataset
from forge.data.blend import BlendedDataset
from forge.data.gpt_dataset import GPTDataset, split_ranges
from forge.data.indexed import FormatError, write_index
from forge.data.loader import batch_indices, batch_iterator
from forge.data.permute import epoch_index
from forge.data.prepare import prepare
from forge.data.shards import ShardSet
from forge.data.tokenizer import CharTokenizer
from test_data_indexed import read_mmidx

L = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two prepared folders of 40 and 30 documents of varied length (char tokenizer)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    out = []
    words = {"a": ["alpha", "beta", "gamma", "delta"], "b": ["one", "two", "three"]}
    tok = CharTokenizer.train(w for ws in words.values() for w in ws + [" "]).save(str(root / "tok"))
    for name, n in (("a", 40), ("b", 30)):
        rows = [{"text": " ".join(rng.choice(words[name], size=rng.integers(1, 12)))} for _ in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        prepare([str(root / f"{name}.jsonl")], str(root / name), tokenizer=tok, shard_size=150)
        out.append(str(root / name))
    return out


def documents(folder):
    """All documents of a prepared folder, via the independent reader."""
    m = json.load(open(os.path.join(folder, "manifest.json")))
    return [d for s in m["shards"] for d in read_mmidx(os.path.join(folder, s["name"]))["seqs"]]


def test_samples_are_windows_of_the_shuffled_stream(data, tmp_path):
    docs = documents(data[0])
    ds = GPTDataset(ShardSet(data[0]), (5, 35), L, seed=3, cache_folder=str(tmp_path))
    assert sorted(ds.doc_idx.tolist()) == list(range(5, 35)) and ds.doc_idx.tolist() != list(range(5, 35))
    stream = [t for d in ds.doc_idx for t in docs[d]]
    assert len(ds) == (len(stream) - 1) // L
    assert sorted(ds.shuffle_idx.tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        j = ds.shuffle_idx[i]
        assert ds[i].dtype == np.int64 and ds[i].tolist() == stream[j * L:j * L + L + 1]


def test_split_by_documents():
    assert split_ranges(40, [0.8, 0.15, 0.05]) == [(0, 32), (32, 38), (38, 40)]
    assert split_ranges(10, [98, 2, 0]) == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(ValueError):
        split_ranges(10, [0, 0, 0])


def test_indices_are_cached_and_deterministic(data, tmp_path, monkeypatch):
    shards = ShardSet(data[0])
    a = GPTDataset(shards, (0, 40), L, seed=1, cache_folder=str(tmp_path / "c1"))
    b = GPTDataset(shards, (0, 40), L, seed=1, cache_folder=str(tmp_path / "c2"))
    c = GPTDataset(shards, (0, 40), L, seed=2, cache_folder=str(tmp_path / "c2"))
    assert [a[i].tolist() for i in range(len(a))] == [b[i].tolist() for i in range(len(b))]
    assert [a[i].tolist() for i in range(len(a))] != [c[i].tolist() for i in range(len(c))]

    def no_build(*args):
        raise AssertionError("indices rebuilt although cached")
    monkeypatch.setattr(gpt_dataset, "build_sample_index", no_build)
    again = GPTDataset(shards, (0, 40), L, seed=1, cache_folder=str(tmp_path / "c1"))
    assert isinstance(again.shuffle_idx, np.memmap)
    monkeypatch.setenv("FORGE_DATA_WAIT_S", "0.2")
    other_rank = GPTDataset(shards, (0, 40), L, seed=1, cache_folder=str(tmp_path / "c1"), rank=1)
    assert np.array_equal(other_rank.shuffle_idx, a.shuffle_idx)
    with pytest.raises(TimeoutError, match="rank 0"):
        GPTDataset(shards, (0, 40), L, seed=1, cache_folder=str(tmp_path / "empty"), rank=1)


def test_ranks_partition_each_global_batch_and_epochs_reshuffle():
    n, B = 23, 2
    one = batch_indices(n, 7, micro_batch_size=3 * B, dp_size=1)
    ranks = [batch_indices(n, 7, micro_batch_size=B, dp_rank=r, dp_size=3) for r in range(3)]
    seen = []
    for _ in range(20):
        g = next(one)
        assert np.concatenate([next(r) for r in ranks]).tolist() == g.tolist()
        seen += g.tolist()
    epochs = [seen[e * n:(e + 1) * n] for e in range(len(seen) // n)]
    assert epochs[0] == list(range(n))                       # epoch 0: the dataset's own order
    assert all(sorted(e) == list(range(n)) for e in epochs)  # every epoch is a permutation ...
    assert len({tuple(e) for e in epochs}) == len(epochs)    # ... and a different one


@pytest.mark.parametrize("consumed", [6, 12, 42, 60])      # mid-epoch and across epoch boundaries
def test_resume_yields_the_uninterrupted_batches(data, tmp_path, consumed):
    ds = GPTDataset(ShardSet(data[1]), (0, 30), L, seed=5, cache_folder=str(tmp_path))
    B, n = 3, 2
    full = [batch_iterator(ds, B, r, n) for r in range(n)]
    for _ in range(consumed // (B * n)):
        for it in full:
            next(it)
    resumed = [batch_iterator(ds, B, r, n, consumed_samples=consumed) for r in range(n)]
    for _ in range(15):
        for a, b in zip(full, resumed):
            x, y = next(a), next(b)
            assert x.shape == (B, L + 1) and x.dtype.is_floating_point is False
            assert x.tolist() == y.tolist()


def test_blend_has_exact_proportions(data, tmp_path):
    dsa = GPTDataset(ShardSet(data[0]), (0, 40), L, seed=1, cache_folder=str(tmp_path))
    dsb = GPTDataset(ShardSet(data[1]), (0, 30), L, seed=1, cache_folder=str(tmp_path))
    w = [0.7, 0.3]
    blend = BlendedDataset([dsa, dsb], w, seed=1, cache_folder=str(tmp_path), size=1000)
    d = np.asarray(blend.dataset_idx)
    counts = np.cumsum(np.eye(2)[d], axis=0)
    quota = np.outer(np.arange(1, 1001), w)
    assert np.abs(counts - quota).max() <= 1.5 and np.abs(counts[-1] - [700, 300]).max() <= 1
    # dataset b (fewer samples than its quota) is read through its own later epochs
    kb = np.asarray(blend.sample_idx)[d == 1]
    assert kb.tolist() == list(range(300)) and 300 > len(dsb)
    for i in range(0, 1000, 37):
        src = [dsa, dsb][d[i]]
        k = int(blend.sample_idx[i])
        assert blend[i].tolist() == src[int(epoch_index(k, len(src), src.seed)[0])].tolist()
        if k < len(src):
            assert blend[i].tolist() == src[k].tolist()


def test_build_data_indexed_blend(data, tmp_path):
    cfg = DataConfig(dataset="indexed", paths=data, blend=[0.5, 0.5], split=[0.8, 0.2, 0.0], seq_len=L,
                     cache_dir=str(tmp_path))
    b = build_data(cfg, seed=1, work_dir=str(tmp_path / "run"))
    assert b.tokenizer.sha256() == ShardSet(data[0]).tokenizer().sha256()
    assert isinstance(b.train, BlendedDataset) and b.test is None
    assert b.train.datasets[0].num_docs == 32 and b.valid.datasets[1].num_docs == 6
    assert next(batch_iterator(b.valid, 2)).shape == (2, L + 1)
    with pytest.raises(ValueError, match="different tokenizers"):
        other = tmp_path / "c"
        prepare([os.path.join(os.path.dirname(data[0]), "b.jsonl")], str(other), train_tokenizer="bpe",
                vocab_size=270)
        build_data(DataConfig(dataset="indexed", paths=[data[0], str(other)], seq_len=L), seed=1)
    with pytest.raises(ValueError, match="valid split has too few tokens"):
        build_data(DataConfig(dataset="indexed", paths=[data[1]], split=[0.99, 0.01, 0], seq_len=L,
                              cache_dir=str(tmp_path)), seed=1)


def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


def test_resident_memory_stays_flat_over_a_1gb_dataset(tmp_path):
    """A sparse 1 GiB .bin (512 Mi uint16 tokens in 8192 documents); touch a sample of it."""
    prefix = str(tmp_path / "big")
    n_docs, doc_len = 8192, 1 << 16
    with open(prefix + ".bin", "wb") as f:
        f.truncate(n_docs * doc_len * 2)
        rng = np.random.default_rng(0)
        for off in rng.integers(0, n_docs * doc_len * 2 - 8192, size=32) & ~1:
            f.seek(int(off))
            f.write(rng.integers(0, 1000, 4096, dtype=np.uint16).tobytes())
    write_index(prefix + ".idx", np.full(n_docs, doc_len), np.uint16)
    before_anon = rss_kb("RssAnon")
    ds = GPTDataset(ShardSet(prefix), (0, n_docs), 2048, seed=0, cache_folder=str(tmp_path / "c"))
    assert len(ds) == (n_docs * doc_len - 1) // 2048
    it = batch_iterator(ds, micro_batch_size=16, consumed_samples=123_456)
    rss0, anon0 = rss_kb("VmRSS"), rss_kb("RssAnon")
    total = 0
    for _ in range(200):                                   # 3200 samples, ~13 MB of tokens read
        total += int(next(it).sum())
    grow_rss, grow_anon = rss_kb("VmRSS") - rss0, rss_kb("RssAnon") - anon0
    assert grow_anon < 8 * 1024, f"anonymous memory grew by {grow_anon} kB"
    assert grow_rss < 64 * 1024, f"resident memory grew by {grow_rss} kB over a 1 GiB dataset"
    assert anon0 - before_anon < 64 * 1024                 # the indices (~2 MB) are not the data


def test_truncated_shard_in_a_prepared_folder_is_refused(data, tmp_path):
    import shutil
    folder = tmp_path / "copy"
    shutil.copytree(data[0], folder)
    with open(folder / "shard_00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(FormatError, match="shard_00001"):
        ShardSet(str(folder))


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 1000, 4097])
def test_epoch_permutation_is_a_seeded_bijection(n):
    from forge.data.permute import permute
    p = permute(np.arange(n), n, seed=11, epoch=1)
    assert sorted(p.tolist()) == list(range(n))
    assert p.tolist() == permute(np.arange(n), n, seed=11, epoch=1).tolist()
    if n >= 10:
        assert p.tolist() != permute(np.arange(n), n, seed=12, epoch=1).tolist()
        assert p.tolist() != permute(np.arange(n), n, seed=11, epoch=2).tolist()
        assert p.tolist() != list(range(n))
