"""The decoder as a DeepSpeed PipelineModule: the stage list of `Transformer`
(forge.models.transformer.decoder_stages), each part in an adapter with a pipeline's one-tensor
forward, as a flat list

    [EmbedPipe, BlockPipe x L, NormPipe, HeadPipe]      (B, T) ids -> ... -> (B, T, V/tp) logits
    (a factorised tied head: [..., NormPipe, HeadDownPipe, tied EmbedPipe], see HeadDownPipe)

cut into stages by DeepSpeed (`parallel.pp_partition`: parameters | uniform | type:<regex>).
With tied embeddings the first and last entries are one TiedLayerSpec("embed"): the last stage
holds a copy of the embedding whose gradient DeepSpeed sums with the first stage's.
Parameter names map to Forge's: "{i}.rest" is "layers.{i-1}.rest" for a block and "rest" for
the others (each adapter names its part by the part's Forge name); "tied_modules.embed.rest" is
"rest". Used only when pp > 1 (pp = 1 trains the plain module, with no pipeline-engine overhead).

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
from forge.models.transformer import Stage, decoder_stages, lm_loss
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.mappings import scatter_to


class EmbedPipe(nn.Module):
    def __init__(self, stage: Stage, tied_head: Stage | None = None):
        super().__init__()
        self.embed = stage.build()
        self.tp_group, self.sequence_parallel = stage.ctx.tp_group, stage.ctx.sp
        # with tied embeddings this module is also the head on the last stage (see tied_head); a
        # factorised head's down-projection is HeadDownPipe's, or the up-projection's transpose
        self.head = tied_head.build(own_weight=False, own_down=False) if tied_head is not None else None
        if self.head is not None:
            self.head.tie_up = stage.cfg.tie_embed_proj

    def forward(self, ids):  # (B, T) -> (B, T, D) or (B, T/tp, D)
        x = self.embed(ids, torch.arange(ids.shape[1], device=ids.device))
        return scatter_to(x, 1, self.tp_group) if self.sequence_parallel else x


def tied_head(module: EmbedPipe, x):  # (B, T, D) (or (B, T, E') down-projected) -> (B, T, V/tp)
    up = module.embed.up.weight if module.head.tie_up else None
    return module.head(x, weight=module.embed.tok.weight, up=up)


class HeadDownPipe(nn.Module):
    """A factorised tied head's own down-projection (B, T, D) -> (B, T, E'), Forge name head.down:
    a layer of its own before the tied head, so that it is not part of the tied copy (whose
    parameters other than the tied weights DeepSpeed neither syncs nor lets a rank write)."""

    def __init__(self, stage: Stage):
        super().__init__()
        full = stage.build()
        self.head = nn.Module()
        self.head.down = full.down
        self.group, self.sp = full.group, full.sp

    def forward(self, x):
        from forge.parallel.mappings import copy_to
        w = self.head.down.weight
        return torch.nn.functional.linear(x, copy_to(w, self.group) if self.sp else w)


class BlockPipe(Block):
    """A Block (the same class and arguments as the stage's) whose positions come from the input."""

    def __init__(self, stage: Stage):
        super().__init__(stage.cfg, stage.index, stage.ctx)
        self.tp = stage.ctx.tp if stage.ctx.sp else 1

    def forward(self, x):  # (B, T, D) or (B, T/tp, D) under sequence parallelism
        return super().forward(x, torch.arange(x.shape[1] * self.tp, device=x.device))


class NormPipe(nn.Module):
    def __init__(self, stage: Stage):
        super().__init__()
        self.norm = stage.build()

    def forward(self, x):
        return self.norm(x)


class HeadPipe(nn.Module):
    def __init__(self, stage: Stage):
        super().__init__()
        self.head = stage.build()

    def forward(self, x):
        return self.head(x)


def pipeline_specs(cfg, ctx: ParallelContext = SINGLE) -> list:
    """decoder_stages(cfg, ctx) as DeepSpeed layer specs."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    stages = decoder_stages(cfg, ctx)
    embed, head = stages[0], stages[-1]
    # the weights used on both stages: the table, and the up-projection when it is also the head's down
    tied = ["embed.tok.weight"] + (["embed.up.weight"] if cfg.tie_embed_proj else [])
    specs = []
    for stage in stages:
        if stage.kind == "embed" and cfg.tie_embeddings:
            specs.append(TiedLayerSpec("embed", EmbedPipe, stage, head, tied_weight_attr=tied))
        elif stage.kind == "head" and cfg.tie_embeddings:
            if cfg.n_embd_wte and not cfg.tie_embed_proj:
                specs.append(LayerSpec(HeadDownPipe, stage))
            specs.append(TiedLayerSpec("embed", EmbedPipe, embed, head, forward_fn=tied_head, tied_weight_attr=tied))
        else:
            adapter = {"embed": EmbedPipe, "block": BlockPipe, "norm": NormPipe, "head": HeadPipe}[stage.kind]
            specs.append(LayerSpec(adapter, stage))
    return specs


def build_pipeline(cfg, groups, sequence_parallel=False, partition="parameters", checkpoint_interval=0, *,
                   seed: int, device=None):
    """This rank's stage as a PipelineModule over `groups.topology` (DeepSpeed wants the topology,
    not an mpu, here): only the stage's layers are built, on the meta device, then materialised
    on `device` (default CPU) and initialised from `seed` by Forge name (forge.models.init), so
    every stage holds exactly the weights one process would."""
    from deepspeed.pipe import PipelineModule
    from torch.utils.checkpoint import checkpoint
    from forge.models.init import WeightInit, materialize
    ctx = groups.context(sequence_parallel)

    def loss_fn(logits, labels):
        return lm_loss(logits, labels, ctx.tp_group)

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
            materialize(self, device or "cpu", WeightInit(cfg, seed, ctx),
                        name_of=lambda n: forge_name(n, cfg.n_layers))

    return StagePipeline(layers=pipeline_specs(cfg, ctx),
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


