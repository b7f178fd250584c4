"""`build_data(cfg.data, ...)`: the tokenizer and the train/valid/test datasets a run reads.

* `dataset: shakespeare`: the embedded plays (forge.data.shakespeare) tokenized once into
  `<cache_dir or ~/.cache/forge>/shakespeare_<tokenizer>/{train,val}/` through the same code as
  `forge prepare`. Rank 0 builds in a temporary folder, writes DONE into it and renames it into
  place (a crash or a concurrent builder never exposes half a build); other ranks wait for DONE.
  `data.tokenizer`: char (alphabet of the corpus), bpe (trained on the train split,
  `data.vocab_size`), or a tokenizer path. The plays' own train/val split is used
  (data.split is ignored); there is no test split.
* `dataset: indexed`: `data.paths` are `forge prepare` folders (or Megatron prefixes) sharing
  one tokenizer, read from beside the data. Each is split by documents (`data.split`) and the
  splits are blended across paths by `data.blend` (default: in proportion to their sizes).

Sample indices are cached in `data.cache_dir`, else beside the data if writable, else under
`work_dir/index_cache`; the shard checks of forge.data.integrity (checksums, token range) are
cached in that folder's `shard_checks.json`. A split with zero weight in data.split is None.
The bundle lists the shard sets it reads and the settings that select samples from them, for
`verify_data` and `check_same_data`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from forge.data.blend import BlendedDataset
from forge.data.cache import wait_for
from forge.data.gpt_dataset import GPTDataset, split_ranges
from forge.data.shards import ShardSet
from forge.data.sources import Record
from forge.data.tokenizer import CharTokenizer, Tokenizer, train_bpe
from forge.fsutil import write_json_atomic

log = logging.getLogger("forge.data")
CHECK_CACHE = "shard_checks.json"        # forge.data.integrity's cache, beside the sample indices
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: object
    valid: Optional[object]
    test: Optional[object] = None
    shard_sets: list = field(default_factory=list)     # the ShardSets read (forge.data.integrity checks them)
    settings: dict = field(default_factory=dict)       # what selects samples from them (in the data fingerprint)


def _tokenizer_tag(cfg) -> str:
    if cfg.tokenizer == "char":
        return "char"
    if cfg.tokenizer == "bpe":
        return f"bpe{cfg.vocab_size}"
    return "tok-" + Tokenizer.load(cfg.tokenizer).sha256()[:12]


def shakespeare_shards(cfg, rank: int = 0) -> str:
    """The folder holding train/ and val/ shard sets of the embedded corpus (built if missing)."""
    from forge.data.prepare import prepare_records
    from forge.data.shakespeare import SPLITS, shakespeare_documents
    root = os.path.join(cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "forge"),
                        f"shakespeare_{_tokenizer_tag(cfg)}")
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        return root
    if rank != 0:
        wait_for(done, "the Shakespeare shards")
        return root
    docs = {s: shakespeare_documents(s) for s in SPLITS}
    if cfg.tokenizer == "char":
        tok = CharTokenizer.train(docs["train"] + docs["val"])
    elif cfg.tokenizer == "bpe":
        tok = train_bpe(docs["train"], cfg.vocab_size)
    else:
        tok = Tokenizer.load(cfg.tokenizer)
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        records = (Record(d, f"shakespeare:{split}:play {i + 1}") for i, d in enumerate(docs[split]))
        prepare_records(records, os.path.join(tmp, split), tok, {"source": "shakespeare", "split": split})
    tok.save(tmp)
    write_json_atomic(os.path.join(tmp, "DONE"), {"tokenizer": cfg.tokenizer})
    try:
        os.rename(tmp, root)
    except OSError:
        if not os.path.exists(done):           # not a concurrent builder that won the race
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the Shakespeare shards in %s", root)
    return root


def _index_folder(cfg, data_path: str, work_dir: Optional[str]) -> str:
    if cfg.cache_dir:
        return os.path.join(cfg.cache_dir, "index_cache")
    beside = data_path if os.path.isdir(data_path) else os.path.dirname(os.path.abspath(data_path))
    if os.access(beside, os.W_OK):
        return os.path.join(beside, "index_cache")
    return os.path.join(work_dir or ".", "index_cache")


def _one_tokenizer(sets: list[ShardSet]) -> Tokenizer:
    digests = {s.path: hashlib.sha256(open(s.tokenizer_path, "rb").read()).hexdigest() for s in sets}
    if len(set(digests.values())) > 1:
        raise ValueError(f"data.paths were prepared with different tokenizers: {digests}")
    return sets[0].tokenizer()


def _checked(ds, split: str):
    if ds is not None and len(ds) == 0:
        raise ValueError(f"the {split} split has too few tokens for one sample of {ds.seq_len + 1} tokens "
                         f"({getattr(ds, 'num_docs', '?')} documents); change data.split or data.seq_len")
    return ds


def build_data(cfg, seed: int, work_dir: Optional[str] = None, rank: int = 0, world_size: int = 1) -> DataBundle:
    """See the module doc. `cfg` is a forge.config.DataConfig; every rank calls this."""
    if cfg.dataset == "shakespeare":
        root = shakespeare_shards(cfg, rank)
        index = os.path.join(root, "index_cache")
        sets = {s: ShardSet(os.path.join(root, s)) for s in ("train", "val")}
        make = lambda s, name: GPTDataset(sets[s], (0, sets[s].num_docs), cfg.seq_len, seed, index, rank, name)
        for s in sets.values():
            s.check_cache = os.path.join(index, CHECK_CACHE)
        bundle = DataBundle(sets["train"].tokenizer(), make("train", "train"), make("val", "valid"),
                            shard_sets=list(sets.values()))
    elif cfg.dataset == "indexed":
        if not cfg.paths:
            raise ValueError("data.dataset=indexed needs data.paths (folders written by forge prepare)")
        sets = [ShardSet(p) for p in cfg.paths]
        for p, s in zip(cfg.paths, sets):
            s.check_cache = os.path.join(_index_folder(cfg, p, work_dir), CHECK_CACHE)
        ranges = [split_ranges(s.num_docs, cfg.split) for s in sets]
        out = dict.fromkeys(SPLIT_NAMES)
        for i, name in enumerate(SPLIT_NAMES[:len(cfg.split)]):
            if cfg.split[i] == 0:
                continue
            parts = [GPTDataset(s, r[i], cfg.seq_len, seed, _index_folder(cfg, p, work_dir), rank,
                                f"{name}:{os.path.basename(p.rstrip('/'))}")
                     for p, s, r in zip(cfg.paths, sets, ranges)]
            out[name] = parts[0] if len(parts) == 1 else BlendedDataset(
                parts, cfg.blend or [len(d) for d in parts], seed, _index_folder(cfg, cfg.paths[0], work_dir),
                rank, name=name)
        bundle = DataBundle(_one_tokenizer(sets), out["train"], out["valid"], out["test"], shard_sets=sets)
    else:
        raise ValueError(f"data.dataset={cfg.dataset!r} is not one of ['indexed', 'shakespeare']")
    bundle.settings = {"dataset": cfg.dataset, "split": list(cfg.split), "blend": cfg.blend,
                       "seq_len": cfg.seq_len, "seed": seed}
    for name in SPLIT_NAMES:
        ds = _checked(getattr(bundle, name), name)
        if ds is not None and rank == 0:
            log.info("data %s", ds.describe())
    return bundle
