"""Data pipeline: tokenizers, `forge prepare` shards, GPT datasets, blending and batching.

    from forge.data import build_data, batch_iterator
    bundle = build_data(cfg.data, seed=cfg.train.seed, work_dir=cfg.train.out_dir, rank=0, world_size=1)
    for batch in batch_iterator(bundle.train, micro_batch_size=8, dp_rank=0, dp_size=1, consumed_samples=0):
        ...   # torch.LongTensor (8, seq_len + 1)

Names are imported lazily so that `forge prepare` workers do not pay for what they do not use.
"""
import importlib

_EXPORTS = {
    "build_data": "forge.data.build", "DataBundle": "forge.data.build",
    "batch_iterator": "forge.data.loader", "batch_indices": "forge.data.loader",
    "Tokenizer": "forge.data.tokenizer", "CharTokenizer": "forge.data.tokenizer",
    "train_bpe": "forge.data.tokenizer",
    "GPTDataset": "forge.data.gpt_dataset", "BlendedDataset": "forge.data.blend",
    "IndexedDataset": "forge.data.indexed", "ShardSet": "forge.data.shards",
    "shakespeare_text": "forge.data.shakespeare",
    "shakespeare_documents": "forge.data.shakespeare",
    "verify_data": "forge.data.integrity", "check_same_data": "forge.data.integrity",
    "data_fingerprint": "forge.data.integrity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forge.data' has no attribute {name!r}")
