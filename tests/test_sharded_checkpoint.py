"""Sharded model weights in checkpoints (forge.models.sharded, forge.layout.weights).

The byte layout: parts written by several ranks, boxes and ZeRO-3 flat ranges, read back exactly
(whole tensors and arbitrary boxes); an index whose parts miss or repeat elements is refused.
A tp=2 and a ZeRO 3 dp=2 run save with no collective that moves tensors (all-gathers, broadcasts
patched to fail while a rank collects its weights and optimizer state): each rank's file holds only
its shards, the weights are stored once (the model folder's size is the model's bytes plus
headers), and they read back equal to the weights the run trained (tests/test_parallel_layouts.py
compares every layout's saved weights with one process's; tests/test_resume_relayout.py reads the
optimizer state back under other layouts).
"""
import glob
import os

import pytest
import torch

from forge.models.sharded import INDEX_FILE, Part, WeightReader, merge_index, write_index, write_parts
from tests.distributed import run_distributed


def test_parts_and_flat_ranges_read_back(tmp_path):
    g = torch.arange(10 * 6, dtype=torch.float32).view(10, 6)
    e = torch.randn(4, 3, 2)                              # 4 experts, tp-split along dim 1 and ep along dim 0
    flat = g[5:].reshape(-1)
    per_rank = [
        write_parts(str(tmp_path), 0, [Part("w", g[:5], (10, 6), (0, 0), (5, 6)),
                                       Part("e", e[:2, :2], (4, 3, 2), (0, 0, 0), (2, 2, 2))]),
        write_parts(str(tmp_path), 1, [Part("w", flat[:17], (10, 6), (5, 0), (5, 6), (0, 17)),
                                       Part("e", e[:2, 2:], (4, 3, 2), (0, 2, 0), (2, 1, 2))]),
        write_parts(str(tmp_path), 2, [Part("w", flat[17:], (10, 6), (5, 0), (5, 6), (17, 30)),
                                       Part("e", e[2:], (4, 3, 2), (2, 0, 0), (2, 3, 2))]),
        write_parts(str(tmp_path), 3, []),                # a rank that owns nothing writes no file
    ]
    write_index(str(tmp_path), merge_index(per_rank))
    assert sorted(os.listdir(tmp_path)) == [INDEX_FILE] + [f"shard-0000{r}.safetensors" for r in range(3)]
    with WeightReader(str(tmp_path)) as r:
        assert sorted(r.names()) == ["e", "w"] and r.shape("w") == (10, 6)
        assert torch.equal(r.get("w"), g) and torch.equal(r.get("e"), e)
        assert torch.equal(r.get_box("w", (3, 2), (4, 3)), g[3:7, 2:5])           # across a box and a flat range
        assert torch.equal(r.get_box("e", (1, 1, 0), (2, 2, 2)), e[1:3, 1:3])


def test_index_refuses_missing_or_repeated_parts(tmp_path):
    g = torch.zeros(4, 2)
    half = write_parts(str(tmp_path), 0, [Part("w", g[:2], (4, 2), (0, 0), (2, 2))])
    with pytest.raises(ValueError, match="'w'.*4 elements, not 8"):
        merge_index([half])
    with pytest.raises(ValueError, match="'w'.*12 elements, not 8"):
        merge_index([half, half, half])
    with pytest.raises(ValueError, match="disagree"):
        merge_index([half, write_parts(str(tmp_path), 1, [Part("w", g[2:].double(), (4, 2), (2, 0), (2, 2))])])


def _no_gather_worker(rank, world, overrides):
    import torch.distributed as tdist

    from forge.config import load_config
    from forge.train import checkpoint
    from forge.train.trainer import train
    inside = []

    def forbid(name):
        real = getattr(tdist, name)

        def call(*a, **k):
            if inside:
                raise AssertionError(f"{name} called while collecting a rank's parts of the checkpoint")
            return real(*a, **k)
        return call
    for name in ("all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list"):
        setattr(tdist, name, forbid(name))
    from forge.layout import optim, weights
    for module, name in ((weights, "rank_parts"), (optim, "rank_optimizer_parts")):   # what each rank writes
        real = getattr(module, name)

        def guarded(*a, _real=real, **k):
            inside.append(1)
            try:
                return _real(*a, **k)
            finally:
                inside.pop()
        setattr(module, name, guarded)
    train(load_config(None, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [["parallel.tp=2"], ["parallel.zero_stage=3"]], ids=["tp2", "zero3"])
def test_each_rank_writes_its_own_part(tmp_path, parallel):
    from forge.models.presets import PRESETS
    from forge.models.transformer import build_model
    out = str(tmp_path / "run")
    over = ["model.preset=tiny-llama", "model.max_seq_len=32", "data.seq_len=32", "train.max_steps=2",
            "train.micro_batch_size=2", "train.save_interval=2", "train.eval_interval=0", "log.progress=false",
            f"train.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *parallel]
    run_distributed(_no_gather_worker, 2, over)
    folder = os.path.join(out, "checkpoints", "step_00000002", "model")
    files = sorted(glob.glob(os.path.join(folder, "shard-*.safetensors")))
    assert [os.path.basename(f) for f in files] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    from safetensors import safe_open
    with safe_open(files[1], framework="pt") as f:           # rank 1: its own shards (or partitions) only
        wq = f.get_slice("layers.0.attn.wq.weight").get_shape()
    d = PRESETS["tiny-llama"].d_model
    assert wq == ([d // 2, d] if "tp" in parallel[0] else [d * d // 2])
    with WeightReader(folder) as r:
        weights = {n: r.get(n) for n in r.names()}
    from forge.config import load_config
    cfg = load_config(os.path.join(folder, "config.yaml")).model
    ref = build_model(cfg, device="meta")
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        n: tuple(t.shape) for n, t in ref.state_dict().items() if n != "head.proj.weight" or not cfg.tie_embeddings}
    stored = sum(os.path.getsize(f) for f in files)
    data = sum(t.numel() * t.element_size() for t in weights.values())
    assert data <= stored <= data + 64 * 1024            # the weights once, plus safetensors headers
