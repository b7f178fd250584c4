"""Between full (tp=1) tensors and this rank's tensor-parallel shards.

A sharded parameter carries `partition_dim` (set by the parallel layers). Sharding takes chunk
`tp_rank` of the full tensor along that dimension; the vocabulary tensors are first padded with
zero rows up to the padded vocabulary. Gathering concatenates the chunks of all ranks and drops
the padding, so gather(shard(x)) == x exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from forge.parallel.mappings import group_rank, group_size

VOCAB_TENSORS = ("embed.tok.weight", "head.proj.weight", "head.proj.bias")


def partition_dims(model) -> dict[str, int]:
    """{parameter name: partition_dim} of the sharded parameters of a model (Forge names)."""
    return {n: p.partition_dim for n, p in model.named_parameters(remove_duplicate=False)
            if getattr(p, "partition_dim", None) is not None}


def _dims(model_or_dims):
    return model_or_dims if isinstance(model_or_dims, dict) else partition_dims(model_or_dims)


def shard_state_dict(full: dict[str, torch.Tensor], model, group) -> dict[str, torch.Tensor]:
    """This rank's shards of a full state dict, for `model` (or its partition_dims) built with
    tensor-parallel `group`."""
    tp, rank, dims = group_size(group), group_rank(group), _dims(model)
    out = {}
    for name, t in full.items():
        dim = dims.get(name)
        if dim is None or tp == 1:
            out[name] = t
            continue
        if name in VOCAB_TENSORS:
            pad = -t.shape[dim] % tp
            if pad:
                t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])], dim=0)
        out[name] = t.chunk(tp, dim=dim)[rank].clone()
    return out


def gather_tensors(local: dict[str, torch.Tensor], model, group, vocab_size: int) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's shards (`local` keyed by parameter name: values or grads)."""
    tp, dims = group_size(group), _dims(model)
    out = {}
    for name, t in local.items():
        dim = dims.get(name)
        if dim is None or tp == 1:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        full = torch.cat(parts, dim=dim)
        out[name] = full[:vocab_size] if name in VOCAB_TENSORS else full
    return out
