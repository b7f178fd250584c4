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


def _params_by_name(model):
    return dict(model.named_parameters(remove_duplicate=False))


def shard_state_dict(full: dict[str, torch.Tensor], model, group) -> dict[str, torch.Tensor]:
    """This rank's shards of a full state dict, for `model` built with tensor-parallel `group`."""
    tp, rank, params = group_size(group), group_rank(group), _params_by_name(model)
    out = {}
    for name, t in full.items():
        dim = getattr(params.get(name), "partition_dim", None)
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
    tp, params = group_size(group), _params_by_name(model)
    out = {}
    for name, t in local.items():
        dim = getattr(params.get(name), "partition_dim", None)
        if dim is None or tp == 1:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        full = torch.cat(parts, dim=dim)
        out[name] = full[:vocab_size] if name in VOCAB_TENSORS else full
    return out
