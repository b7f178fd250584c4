"""The decoder as a DeepSpeed PipelineModule: the same modules as `Transformer`, as a flat list

    [EmbedPipe, BlockPipe x L, NormPipe, HeadPipe]      (B, T) ids -> ... -> (B, T, V/tp) logits

cut into stages by DeepSpeed (`parallel.pp_partition`: parameters | uniform | type:<regex>).
With tied embeddings the first and last entries are one TiedLayerSpec("embed"): the last stage
holds a copy of the embedding whose gradient DeepSpeed sums with the first stage's.
Parameter names map to Forge's: "{i}.rest" is "layers.{i-1}.rest" for a block and "rest" for
the others; "tied_modules.embed.rest" is "rest". Used only when pp > 1 (pp = 1 trains the plain
module, with no pipeline-engine overhead).

Mixture of experts: a BlockPipe's MoE holds this rank's E/ep experts (all-to-all over the
stage's expert-parallel group, which lies inside one stage's data-parallel ranks). Its auxiliary
losses need nothing from the pipeline: `attach_aux_loss` hangs them on the block's output, so the
stage's backward (driven by the gradient received from the next stage) also backpropagates them.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from forge.models.block import Block
from forge.models.layers.norm import build_norm
from forge.models.transformer import Embedding, Head, lm_loss
from forge.parallel.mappings import group_size, scatter_to


def _positions(x, tp_group, sequence_parallel):
    T = x.shape[1] * (group_size(tp_group) if sequence_parallel else 1)
    return torch.arange(T, device=x.device)


class EmbedPipe(nn.Module):
    def __init__(self, cfg, tp_group=None, sequence_parallel=False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.embed = Embedding(cfg, tp_group)
        # with tied embeddings this module is also the head on the last stage (see tied_head)
        self.head = Head(cfg, tp_group, sequence_parallel, own_weight=False) if cfg.tie_embeddings else None

    def forward(self, ids):  # (B, T) -> (B, T, D) or (B, T/tp, D)
        x = self.embed(ids, torch.arange(ids.shape[1], device=ids.device))
        return scatter_to(x, 1, self.tp_group) if self.sequence_parallel else x


def tied_head(module: EmbedPipe, x):  # (B, T, D) -> (B, T, V/tp)
    return module.head(x, weight=module.embed.tok.weight)


class BlockPipe(Block):
    def __init__(self, cfg, layer_idx, tp_group=None, sequence_parallel=False, ep_group=None):
        super().__init__(cfg, layer_idx, tp_group, sequence_parallel, ep_group)
        self.tp_group, self.sp = tp_group, sequence_parallel

    def forward(self, x):
        return super().forward(x, _positions(x, self.tp_group, self.sp))


class NormPipe(nn.Module):
    def __init__(self, cfg, tp_group=None, sequence_parallel=False):
        super().__init__()
        self.norm = build_norm(cfg, grad_group=tp_group if sequence_parallel else None) if cfg.final_norm else nn.Identity()

    def forward(self, x):
        return self.norm(x)


class HeadPipe(nn.Module):
    def __init__(self, cfg, tp_group=None, sequence_parallel=False):
        super().__init__()
        self.head = Head(cfg, tp_group, sequence_parallel)

    def forward(self, x):
        return self.head(x)


def pipeline_specs(cfg, tp_group=None, sequence_parallel=False, ep_group=None) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    sp = sequence_parallel and group_size(tp_group) > 1
    args = (cfg, tp_group, sp)
    tie = dict(tied_weight_attr=["embed.tok.weight"])
    first = TiedLayerSpec("embed", EmbedPipe, *args, **tie) if cfg.tie_embeddings else LayerSpec(EmbedPipe, *args)
    last = (TiedLayerSpec("embed", EmbedPipe, *args, forward_fn=tied_head, **tie) if cfg.tie_embeddings
            else LayerSpec(HeadPipe, *args))
    blocks = [LayerSpec(BlockPipe, cfg, i, tp_group, sp, ep_group) for i in range(cfg.n_layers)]
    return [first, *blocks, LayerSpec(NormPipe, *args), last]


def build_pipeline(cfg, groups, sequence_parallel=False, partition="parameters", checkpoint_interval=0, *,
                   seed: int, device=None):
    """This rank's stage as a PipelineModule over `groups.topology` (DeepSpeed wants the topology,
    not an mpu, here): only the stage's layers are built, on the meta device, then materialised
    on `device` (default CPU) and initialised from `seed` by Forge name (forge.models.init), so
    every stage holds exactly the weights one process would."""
    from deepspeed.pipe import PipelineModule
    from torch.utils.checkpoint import checkpoint
    from forge.models.init import WeightInit, materialize
    tp_group = groups.tp_group

    def loss_fn(logits, labels):
        return lm_loss(logits, labels, tp_group)

    class StagePipeline(PipelineModule):
        """DeepSpeed builds every layer of every stage to count parameters ("parameters"
        partitioning) and then its stage's layers on the default device: both run on the meta
        device here, and the stage is materialised before DeepSpeed moves it and syncs ties.
        (Overrides DeepSpeed 0.19's private PipelineModule._count_layer_params and _build.)"""

        def _count_layer_params(self):
            with torch.device("meta"):
                return super()._count_layer_params()

        def _build(self):
            with torch.device("meta"):
                super()._build()
            materialize(self, device or "cpu", WeightInit(cfg, seed, tp_group, groups.ep_group),
                        name_of=lambda n: forge_name(n, cfg.n_layers))

    return StagePipeline(layers=pipeline_specs(cfg, tp_group, sequence_parallel, groups.ep_group),
                         topology=groups.topology,
                         loss_fn=loss_fn, partition_method=partition,
                         activation_checkpoint_interval=checkpoint_interval,
                         activation_checkpoint_func=lambda f, *a: checkpoint(f, *a, use_reentrant=False))


_LAYER = re.compile(r"^(\d+)\.(.*)$")


def forge_name(pipe_name: str, n_layers: int) -> str:
    """Forge parameter name of a PipelineModule parameter name."""
    if pipe_name.startswith("tied_modules.embed."):
        return pipe_name[len("tied_modules.embed."):]
    m = _LAYER.match(pipe_name)
    if not m:
        raise KeyError(f"unexpected pipeline parameter {pipe_name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    return f"layers.{idx - 1}.{rest}" if 1 <= idx <= n_layers else rest


