"""This rank's weights in a sharded Forge model folder (forge.models.sharded): written and read
per rank, with no gather of the model anywhere.

Each tensor a rank holds is a box of a global tensor (Forge name, tp=1, unpadded vocabulary,
all experts): a tp shard starts at tp_rank * local along its `partition_dim` (a vocabulary
tensor's box stops at the vocabulary: padding rows are not stored), an expert slice at
ep_rank * E/ep along dim 0. Under ZeRO 3 a rank holds a flat range of its tp box (DeepSpeed's
partition `ds_tensor`: elements dp_rank * n .. of the flattened box).

Who writes what (every tensor exactly once): tp-sharded tensors every tp rank, replicated ones tp
rank 0; dense tensors data-parallel rank 0 (ZeRO 3: every data-parallel rank its partition);
experts the first replica of each expert slice (dp_rank < ep); a pipeline's tied copy of the
embedding on the last stage (DeepSpeed marks it ds_pipe_replicated) never.
Any layout reads its boxes back from any other layout's files (`load_rank_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.deepspeed_compat import pipe_replicated
from forge.models.sharded import Part, WeightReader
from forge.parallel.groups import ParallelGroups
from forge.parallel.sharding import VOCAB_TENSORS


@dataclass
class Box:
    name: str                       # Forge name
    tensor: torch.Tensor            # the rank's parameter or buffer
    global_shape: tuple
    start: tuple
    box: tuple                      # the rank's extent (vocabulary tensors: without padding rows)
    local: tuple                    # the rank's tensor shape (ZeRO 3: before partitioning)


def rank_boxes(model, cfg, groups: ParallelGroups, name_of) -> list[Box]:
    """Every distinct parameter and persistent buffer of this rank's model with its box.
    name_of: the Forge name of a name of `model`."""
    out, seen = [], set()
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(model, n)]
    for name, t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        forge = name_of(name)
        local = tuple(getattr(t, "ds_shape", t.shape))
        start, full = [0] * len(local), list(local)
        box = list(local)
        dim = getattr(t, "partition_dim", None)
        if dim is not None and groups.tp > 1:
            start[dim] = groups.tp_rank * local[dim]
            full[dim] = local[dim] * groups.tp
            if forge in VOCAB_TENSORS:
                full[dim] = cfg.vocab_size
                box[dim] = max(0, min(local[dim], cfg.vocab_size - start[dim]))
        if getattr(t, "expert", False) and groups.ep > 1:
            start[0] = groups.ep_rank * local[0]
            full[0] = local[0] * groups.ep
        out.append(Box(forge, t, tuple(full), tuple(start), tuple(box), local))
    return out


def _non_persistent(model, buffer_name: str) -> set:
    owner = model.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else model
    return owner._non_persistent_buffers_set


def box_part(b: Box, value: torch.Tensor, name: str | None = None) -> Part:
    """The rank's whole tensor `value` (shaped like b.tensor) as a part of the global tensor."""
    if tuple(value.shape) != b.box:                            # vocabulary padding rows dropped
        value = value.narrow(b.tensor.partition_dim, 0, b.box[b.tensor.partition_dim])
    return Part(name or b.name, value, b.global_shape, b.start, b.box)


def flat_part(b: Box, flat: torch.Tensor, start: int, name: str | None = None) -> Part:
    """Elements start .. start + len(flat) of the rank's flattened tensor as a part."""
    return Part(name or b.name, flat, b.global_shape, b.start, b.local, (start, start + flat.numel()))


def zero3_range(t, groups: ParallelGroups) -> tuple[int, int]:
    """The elements [a, b) of the flattened tensor that this rank's ZeRO 3 partition holds."""
    n = t.ds_tensor.numel()
    a = min(groups.dp_rank * n, t.ds_numel)
    return a, min(a + n, t.ds_numel)


def writes_whole(t, groups: ParallelGroups) -> bool:
    """Whether this rank writes a tensor that it holds whole (not partitioned over data parallelism):
    tp-replicated ones only on tp rank 0, dense ones on data-parallel rank 0, experts on the first
    replica of each expert slice, a pipeline's tied copy never."""
    if pipe_replicated(t):
        return False
    if getattr(t, "partition_dim", None) is None and groups.tp_rank != 0:
        return False
    return groups.dp_rank < groups.ep if getattr(t, "expert", False) else groups.dp_rank == 0


def rank_parts(model, cfg, groups: ParallelGroups, name_of) -> list[Part]:
    """The parts this rank writes (see the module docstring for who writes what)."""
    parts = []
    for b in rank_boxes(model, cfg, groups, name_of):
        t = b.tensor
        if 0 in b.box:
            continue
        if hasattr(t, "ds_tensor"):                            # ZeRO 3: this rank's flat partition
            a, e = zero3_range(t, groups)
            if a < e and (getattr(t, "partition_dim", None) is not None or groups.tp_rank == 0):
                parts.append(flat_part(b, t.ds_tensor.detach()[:e - a], a))
        elif writes_whole(t, groups):
            parts.append(box_part(b, t.detach()))
    return parts


@torch.no_grad()
def load_rank_weights(model, cfg, groups: ParallelGroups, folder: str, name_of, names=None) -> None:
    """Copy this rank's boxes of every tensor (or of `names`, Forge names) from a Forge model
    folder of any layout (sharded or single file), reading only those boxes (under ZeRO 3 the
    rank's tp box, of which it keeps its partition)."""
    with WeightReader(folder) as reader:
        for b in rank_boxes(model, cfg, groups, name_of):
            if names is not None and b.name not in names:
                continue
            have = reader.shape(b.name)
            if tuple(have) != b.global_shape:
                raise ValueError(f"{folder}: tensor {b.name!r} has shape {tuple(have)}, this model's is "
                                 f"{b.global_shape}")
            part = reader.get_box(b.name, b.start, b.box)
            reader.close()                  # unmap what was read: mapped pages count as resident
            if hasattr(b.tensor, "ds_tensor"):                 # ZeRO 3: this rank's flat partition
                whole = torch.zeros(b.local, dtype=part.dtype)
                whole[tuple(slice(0, n) for n in b.box)] = part
                a, e = zero3_range(b.tensor, groups)
                b.tensor.ds_tensor[:e - a].copy_(whole.view(-1)[a:e])
                continue
            dst = b.tensor
            if tuple(dst.shape) != b.box:                      # vocabulary padding rows stay as they are
                dst = dst.narrow(b.tensor.partition_dim, 0, b.box[b.tensor.partition_dim])
            dst.copy_(part)
