"""Build this rank's part of a parallel layout, and only that part: its tp shards, its pipeline
stage's layers and its E/ep experts are constructed on the meta device, then materialised on the
training device one parameter at a time and initialised there from the seed by Forge name
(forge.models.init), so every layout starts from the weights one process would have.

    pp == 1: a Transformer with tp-sharded layers (a plain Transformer at tp == 1)
    pp > 1:  a DeepSpeed PipelineModule of the same layers over the groups' topology
    ZeRO 3:  each parameter is handed to DeepSpeed's zero.Init partitioning as soon as it holds
             its value, so a rank holds its 1/dp partitions plus at most one full parameter.
`full_state_dict` is the inverse for small models and tests: gather shards over tp, experts over
ep and stages over pp to one full state dict (Forge names) on global rank 0. Checkpoints never
gather: each rank writes its own part (forge.layout.weights, forge.layout.optim).
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from forge.models.io import unique_state_dict
from forge.models.transformer import Transformer, build_model
from forge.parallel.groups import ParallelGroups
from forge.parallel.sharding import gather_tensors, partition_dims


def build_for_layout(cfg, groups: ParallelGroups, sequence_parallel=False, partition="parameters",
                     checkpoint_interval=0, *, seed: int, device=None, zero3_config: dict | None = None):
    """The model for this rank, initialised from `seed` on `device` (default CPU).
    zero3_config: the DeepSpeed config when training under ZeRO 3 (parameters partitioned as built)."""
    if groups.pp == 1:
        part = zero3_partitioner(zero3_config, groups) if zero3_config else None
        model = build_model(cfg, groups.context(sequence_parallel), device=device or "cpu", seed=seed,
                            partition=part)
    else:
        from forge.layout.pipeline import build_pipeline
        model = build_pipeline(cfg, groups, sequence_parallel, partition, checkpoint_interval, seed=seed,
                               device=device)
        with torch.device("meta"):           # parameter names and partition dims of the tp layout
            model.forge_partition_dims = partition_dims(Transformer(cfg, groups.context(sequence_parallel)))
    if cfg.steering_freeze_model:
        freeze_all_but_steering(model)
    return model


def freeze_all_but_steering(model: torch.nn.Module) -> None:
    """model.steering_freeze_model: every parameter but the steering vector (layers.{L}.steering)
    gets requires_grad=False, so the optimizer (forge.train.optimizers.param_groups) and gradient
    clipping see the steering vector alone and the model's weights stay as they were."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] == "steering")


def zero3_partitioner(ds_config: dict, groups: ParallelGroups):
    """A `partition` callback for forge.models.init.materialize: hands each parameter, once it
    holds its value, to DeepSpeed's ZeRO 3 partitioning over the data-parallel group (what
    `deepspeed.zero.Init` does to a module built inside it; the engine then finds the
    parameters partitioned already). The first goes through zero.Init(module=...), the rest
    through the converter it attaches to every partitioned parameter, as DeepSpeed's engine does."""
    import deepspeed
    first: list[torch.nn.Parameter] = []
    # the dtype DeepSpeed's ZeRO 3 keeps its parameters in (zero.Init casts what it creates, not
    # what it is handed); the optimizer holds the fp32 master partitions
    dtype = (torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else
             torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)

    def partition(p: torch.nn.Parameter) -> None:
        p.data = p.data.to(dtype)
        if first:
            first[0].convert_to_zero_parameters(param_list=[p])
            return
        holder = torch.nn.Module()
        holder.register_parameter("p", p)
        deepspeed.zero.Init(module=holder, data_parallel_group=groups.dp_group, config_dict_or_path=ds_config,
                            mpu=groups if groups.tp > 1 or groups.dp > 1 else None)
        first.append(p)
    return partition


def _forge_name(name: str, model, cfg) -> str:
    """Forge's name for a parameter of `model` (a pipeline stage's names differ)."""
    if not hasattr(model, "forge_partition_dims"):
        return name
    from forge.layout.pipeline import forge_name
    return forge_name(name, cfg.n_layers)


def forge_name_of(model, cfg):
    """name of `model` -> Forge name (the identity unless `model` is a pipeline stage)."""
    return lambda name: _forge_name(name, model, cfg)


def stage_state_dict(model, cfg) -> dict[str, torch.Tensor]:
    """This rank's tensors under Forge names (a pipeline stage's part, or the whole model)."""
    if not hasattr(model, "forge_partition_dims"):
        return unique_state_dict(model)
    return {_forge_name(n, model, cfg): t.detach() for n, t in model.state_dict().items()}


def full_state_dict(model, cfg, groups: ParallelGroups) -> dict[str, torch.Tensor] | None:
    """The full (tp=1, one stage) state dict on global rank 0; None on the other ranks.
    Every rank must call it (collectives over tp, then pp)."""
    local = stage_state_dict(model, cfg)
    layout = getattr(model, "forge_partition_dims", model)
    full = gather_tensors(local, layout, groups.tp_group, cfg.vocab_size)
    if groups.ep > 1:
        from forge.models.layers.moe import expert_params, gather_experts
        full = gather_experts(full, {_forge_name(n, model, cfg) for n in expert_params(model)}, groups.ep_group)
    if groups.pp == 1 or not dist.is_initialized():
        return full if groups.rank == 0 else None
    stages = [None] * groups.pp
    dist.all_gather_object(stages, {k: v.cpu() for k, v in full.items()} if groups.tp_rank == 0 and
                           groups.dp_rank == 0 else None, group=groups.pp_group)
    if groups.rank != 0:
        return None
    merged = {}
    for part in stages:
        for k, v in (part or {}).items():
            merged.setdefault(k, v)          # a tied embedding appears on the first and last stage
    return merged
