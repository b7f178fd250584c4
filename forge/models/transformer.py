"""The decoder: embed -> layers["0".."L-1"] -> norm -> head.

    x_0 = D(s * E[ids] U^T (+ P[pos]))              (B, T) -> (B, T, D)
    x_l = Block_l(x_{l-1})                          (B, T, D)
    logits = f softcap((N(x_L) W_head + b) / q)     (B, T, V)  (V/tp per rank under tensor parallelism)
f = ln(b) / t of model.output_softmax (1 for softmax): loss and sampling take softmax of the
returned logits, which is b^(z/t) / sum b^(z/t).
s = model.embed_scale (a learned scalar when model.embed_scale_learned), q = model.logit_divisor.
Factorised embeddings (model.n_embd_wte = E' < D): E is (V, E'), U (D, E') the up-projection
(embed.up); a tied head is then W_head = (E Dn)^T with the down-projection Dn (E', D) (head.down,
or U^T when model.tie_embed_proj), i.e. logits = (N(x_L) Dn^T) E^T. Unfactorised: U = Dn = I.
Under tp the table is vocab-parallel (its lookups summed over ranks) and U, Dn are replicated:
they act on replicated activations before the table's all-reduce (U) or before the head's
copy_to (Dn), so each rank computes the same full gradient (under sequence parallelism Dn sees
this rank's tokens and its weight enters through copy_to, summing the partial gradients).
`decoder_stages` lists these parts in order (Forge name, kind, constructor); `Transformer` and the
pipeline (forge.layout.pipeline) are both assembled from that one list, so a pipeline stage holds
exactly the modules one process would. With tied embeddings the head reuses E.
Every constructor takes a ParallelContext (tp and ep groups, sequence parallelism).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge.config import ModelConfig
from forge.models.block import Block, set_attention_checkpointing
from forge.models.layers.attention import KVCache
from forge.models.layers.norm import build_norm
from forge.models.layers.position import POSITION
from forge.parallel.context import SINGLE, ParallelContext
from forge.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from forge.parallel.mappings import copy_to, group_size, scatter_to


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    """Vocabulary rounded up to a multiple of the tensor-parallel size."""
    return tp * math.ceil(cfg.vocab_size / tp)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = SINGLE):
        super().__init__()
        self.tok = VocabParallelEmbedding(padded_vocab(cfg, ctx.tp), cfg.embed_dim, ctx.tp_group, quant=cfg.quant)
        # factorised: (B, T, E') -> (B, T, D), replicated over tp (see the module docstring)
        self.up = nn.Linear(cfg.n_embd_wte, cfg.d_model, bias=False) if cfg.n_embd_wte else None
        pos_cls = POSITION[cfg.position].get("embed")
        self.pos = pos_cls(cfg) if pos_cls else None
        self.scale, self.dropout = cfg.embed_scale, cfg.dropout
        # a learned scalar s (initialised at embed_scale by init_constants); shape (1,), not (): DeepSpeed's
        # engine broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as
        self.scale_param = nn.Parameter(torch.empty(1)) if cfg.embed_scale_learned else None

    def init_constants(self):
        if self.scale_param is not None:
            self.scale_param.fill_(self.scale)

    def forward(self, ids, pos):  # (B, T), (T,) -> (B, T, D)
        x = self.tok(ids)                                   # (B, T, E')
        if self.up is not None:
            x = self.up(x)                                  # (B, T, D)
        if self.scale_param is not None:
            x = x * self.scale_param.to(x.dtype)
        elif self.scale != 1.0:
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        if self.pos is not None:
            x = self.pos(x, pos)
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class Head(nn.Module):
    """Vocab-parallel output layer; the columns of padding tokens (ids >= vocab_size, present when
    tp does not divide the vocabulary) get logit -inf so they never carry probability."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = SINGLE, own_weight=True, own_down=True):
        """own_weight=False: the (tied) weight is passed to forward; own_down=False: the input arrives
        down-projected already (a pipeline keeps a tied head's own down-projection out of the tied copy)."""
        super().__init__()
        tp = ctx.tp
        factorised = cfg.tie_embeddings and cfg.n_embd_wte
        self.proj = ColumnParallelLinear(cfg.embed_dim if factorised else cfg.d_model, padded_vocab(cfg, tp),
                                         cfg.head_bias, ctx.tp_group, sequence_parallel=ctx.sp,
                                         skip_weight=not own_weight)
        # a tied factorised head's down-projection Dn (E', D); with tie_embed_proj it is passed to forward
        self.down = (nn.Linear(cfg.d_model, cfg.n_embd_wte, bias=False)
                     if factorised and not cfg.tie_embed_proj and own_down else None)
        self.group, self.sp = ctx.tp_group, ctx.sp
        self.softcap, self.divisor = cfg.logit_softcap, cfg.logit_divisor
        self.factor = cfg.output_logit_factor      # model.output_softmax: softmax(factor z) = b^(z/t) / sum
        local = padded_vocab(cfg, tp) // tp
        self.vocab = (ctx.tp_rank * local, local, cfg.vocab_size)    # (start, local, vocab)
        self.padded = self.vocab[0] + local > cfg.vocab_size
        self.init_buffers()

    def init_buffers(self):
        start, local, vocab = self.vocab
        self.register_buffer("pad_mask", start + torch.arange(local) >= vocab, persistent=False)

    def forward(self, x, weight=None, up=None):  # (B, T, D) -> (B, T, V/tp); weight: a tied embedding
        """up: the embedding's up-projection U (D, E') when the down-projection is tied to it (Dn = U^T)."""
        down = self.down.weight if self.down is not None else None if up is None else up.t()
        if down is not None:                                # (B, T, D) -> (B, T, E')
            x = F.linear(x, copy_to(down, self.group) if self.sp else down)
        logits = self.proj(x, weight)
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if self.factor != 1.0:
            logits = logits * self.factor
        if self.padded:
            logits = logits.masked_fill(self.pad_mask, float("-inf"))
        return logits


def final_norm(cfg: ModelConfig, ctx: ParallelContext = SINGLE) -> nn.Module:
    # under sequence parallelism the norm sees T/tp tokens: its gradients are summed over tp
    return (build_norm(cfg, grad_group=ctx.tp_group if ctx.sp else None, kind=cfg.norm_at("final"))
            if cfg.final_norm else nn.Identity())


@dataclass(frozen=True)
class Stage:
    """One part of the decoder: its Forge name, its kind (embed | block | norm | head), the
    constructor of its module (build(**extra) -> nn.Module) and what that was given."""
    name: str
    kind: str
    build: Callable[..., nn.Module]
    cfg: ModelConfig
    ctx: ParallelContext
    index: int | None = None        # the layer index of a block


def decoder_stages(cfg: ModelConfig, ctx: ParallelContext = SINGLE) -> list[Stage]:
    """The decoder's parts in order: embed, layers.0 .. layers.{L-1}, norm, head. (With tied
    embeddings the head's weight is the embedding's; the assembler ties them.) Every part is
    built from the resolved config (ModelConfig.resolved: each size under one name)."""
    cfg = cfg.resolved()
    return [Stage("embed", "embed", partial(Embedding, cfg, ctx), cfg, ctx),
            *(Stage(f"layers.{i}", "block", partial(Block, cfg, i, ctx), cfg, ctx, i) for i in range(cfg.n_layers)),
            Stage("norm", "norm", partial(final_norm, cfg, ctx), cfg, ctx),
            Stage("head", "head", partial(Head, cfg, ctx), cfg, ctx)]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = SINGLE):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg, self.tp_group, self.sequence_parallel = cfg, ctx.tp_group, ctx.sp
        self.layers = nn.ModuleDict()
        for stage in decoder_stages(cfg, ctx):
            if stage.kind == "block":
                self.layers[str(stage.index)] = stage.build()
            else:
                setattr(self, stage.name, stage.build())
        if cfg.tie_embeddings:
            self.head.proj.weight = self.embed.tok.weight
        self.activation_checkpointing = "none"       # none | full | attention
        # a manual steering vector (forge.steer.set_steering): (layer l, v (D,)) adds v to the
        # residual stream after block l's output, x_l <- x_l + v; None: no steering. Not a
        # parameter: it is not saved with the model.
        self.steering: tuple[int, torch.Tensor] | None = None
        # model.steering_datasets: the dataset index whose learned vector every sample gets when forward
        # is given none (forge generate --steer-dataset); None: no learned vector then
        self.steering_dataset: int | None = None

    def set_activation_checkpointing(self, mode: str) -> None:
        if mode not in ("none", "full", "attention"):
            raise ValueError(f"train.activation_checkpointing={mode!r} is not one of ['attention', 'full', 'none']")
        self.activation_checkpointing = mode
        set_attention_checkpointing(self, mode == "attention")

    def forward(self, ids, cache: KVCache | None = None, pos_offset: int | None = None, dataset=None):
        """ids (B, T) -> logits (B, T, V) (vocab-parallel shard under tp). With a KVCache the
        tokens continue the cached sequence (positions start at the cache length). dataset (B,):
        each sample's dataset index for model.steering_datasets (default: self.steering_dataset)."""
        start = cache.length if cache is not None else (pos_offset or 0)
        if dataset is None and self.steering_dataset is not None:
            dataset = torch.full((ids.shape[0],), self.steering_dataset, dtype=torch.long, device=ids.device)
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.embed(ids, pos)                                               # (B, T, D)
        if self.sequence_parallel:
            if ids.shape[1] % group_size(self.tp_group):
                raise ValueError(f"sequence length {ids.shape[1]} is not divisible by parallel.tp="
                                 f"{group_size(self.tp_group)} (needed by parallel.sequence_parallel)")
            x = scatter_to(x, 1, self.tp_group)                                # (B, T/tp, D)
        for i, layer in enumerate(self.layers.values()):
            if self.activation_checkpointing == "full" and self.training and cache is None:
                x = checkpoint(layer, x, pos, None, dataset, use_reentrant=False)
            else:
                x = layer(x, pos, cache, dataset)
            if self.steering is not None and self.steering[0] == i:
                x = x + self.steering[1].to(x.dtype)                           # (B, T, D) + (D,)
        up = self.embed.up.weight if self.cfg.tie_embed_proj else None
        logits = self.head(self.norm(x), up=up)
        return logits

    def loss(self, logits, targets, ignore_index: int = -100):
        return lm_loss(logits, targets, self.tp_group, ignore_index)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and name.startswith("embed.")):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def lm_loss(logits, targets, tp_group=None, ignore_index: int = -100):
    """Mean token cross-entropy of logits (B, T, V/tp) against targets (B, T); exact under
    vocab-parallel logits (no log(tp) offset)."""
    per_token = vocab_parallel_cross_entropy(logits, targets, tp_group, ignore_index)
    return per_token.sum() / (targets != ignore_index).sum().clamp_min(1)


def build_model(cfg: ModelConfig, ctx: ParallelContext = SINGLE, *,
                device=None, seed: int | None = None, init: bool = True, partition=None) -> Transformer:
    """This rank's decoder (its tp shards and ep experts), constructed on the meta device and then
    materialised on `device` (default: torch's default device, CPU unless set; "meta", also from
    a `with torch.device("meta")` block, returns it unmaterialised) one parameter at a time. init=True fills it from `seed` by Forge name (forge.models.init; seed None: drawn from
    torch's global generator, so torch.manual_seed(s) still fixes the model); init=False leaves
    the weights uninitialised for a caller that loads them. `partition`: see materialize (ZeRO 3)."""
    from forge.models.init import WeightInit, materialize
    cfg.validate()
    with torch.device("meta"):
        model = Transformer(cfg, ctx)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":
        return model
    if init and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    weights = WeightInit(cfg, seed, ctx) if init else None
    return materialize(model, device, weights, partition=partition)
