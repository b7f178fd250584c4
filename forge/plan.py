"""`forge plan [CONFIG] [key=value ...] --world N [--gpu-mem GiB] [--json]`: the memory of every
rank of a parallel layout, before launching it.

    forge plan model.preset=llama3-70b parallel.tp=8 parallel.pp=8 train.precision=bf16 --world 1024
    forge plan configs/x.yaml parallel.zero_stage=3 --world 64 --gpu-mem 80 --json

Every distinct rank's layers are built on the meta device in this one process (nothing is
allocated), under a fake process group of N ranks (torch's "fake" backend) whose tensor- and
expert-parallel groups give each module its real shapes: vocabulary padding, kv heads replicated
when n_kv_heads < tp, E/ep experts. Layers of one kind (embedding, a dense or MoE block of one
attention kind, final norm, head) have one shape, so each kind is built once per (tp rank, ep
rank). The pipeline's layer list is forge.layout.pipeline.pipeline_specs's
[embed, block_0 .. block_{L-1}, norm, head], cut into stages as DeepSpeed's
PipelineModule._partition_layers cuts it (parallel.pp_partition: "parameters" =
partition_balanced over each layer's trainable parameter count, "uniform" = partition_uniform,
"type:<regex>" = partition_balanced over 0/1 weights of the layers whose class name matches);
pp = 1 is one stage holding every layer (the plain Transformer's modules).

Rows: one per distinct shard, a (tp rank, pipeline stage, ep rank); its data-parallel replicas
(same tp, pp and ep rank) hold the same tensors (under ZeRO each its own equal, padded partition)
and share the row (`ranks_covered`; `rank` is the smallest). The table merges rows of one stage
whose figures are equal.

Parameters: `params` counts what the rank holds (tp-replicated tensors, the vocabulary padding
rows, a tied embedding's copy on the last stage): that is what costs memory. `model_params` is the
rank's share of the model's distinct parameters: a tp-replicated tensor (no `partition_dim`)
counts on tp rank 0, a dense tensor on ep rank 0 (the other ep ranks are its data-parallel
replicas), a tied module on its first stage, a vocabulary shard only its rows < model.vocab_size
(the padding is `padding_params`). Over the rows they sum to the model's `params`, the tp = 1
count of distinct parameters (tied once).

Model states, bytes per held parameter; N = the data-parallel size dp for dense parameters and
dp / ep for experts (DeepSpeed partitions an expert's gradients and optimizer state over its
expert-data-parallel group); partitions are ceil(elements / N) (DeepSpeed pads to equal parts):

    precision  ZeRO  weights  grads  optimizer   per parameter
    bf16/fp16  0     4        4      8           16        fp32 weights under autocast (pp = 1)
    bf16       0     2        2      12/N        4 + 12/N  pp > 1: DeepSpeed's BF16_Optimizer
    bf16/fp16  1     2        2      12/N        4 + 12/N  fp32 master + Adam m, v partitioned
    bf16/fp16  2     2        2/N    12/N        2 + 14/N
    bf16/fp16  3     2/N      2/N    12/N        16/N
    fp32       0     4        4      8           16
    fp32       1     4        4      12/N        8 + 12/N  DeepSpeed keeps an fp32 copy of its
    fp32       2     4        4/N    12/N        4 + 16/N  partition even of fp32 weights
    fp32       3     4/N      4/N    12/N        20/N

The optimizer column is for optim.name=adamw (2 fp32 states per element, m and v: 8, or 4 + 8
with the fp32 master). For k fp32 states per element it is 4k whole, (4 + 4k)/N partitioned
(forge.train.optimizers.state_count): lion 1 (m), sgd 1 (its momentum buffer; 0 without
momentum), adafactor 0 for matrices (factored: rows + columns, O(R + C), not counted) and 1 for
vectors, muon 1 for its hidden matrices and 2 (AdamW) for embeddings, head, norms and biases, soap
2 + 2 (R^2 + C^2) / (R C) for its hidden (R, C) matrices (m, v; L, Q_L; R, Q_R) and 2 for the rest.
(forge.train.precision; DeepSpeed 0.19 as forge.train.engine.build_ds_config configures it,
measured by tests/test_plan.py against a gloo run). ZeRO 1's gradients are whole: DeepSpeed's
stage 1 reduces them only at the gradient-accumulation boundary, so a rank holds all of them
between micro batches and through backward (after the boundary reduction its partition remains,
2 + 14/N, which tools/bench_parallel.py reports at grad_accum = 1). ZeRO 3 keeps a parameter of at
most stage3_param_persistence_threshold elements (DeepSpeed's 1e5 unless the parallel.ds_config
template sets it) whole on every rank: its weight bytes again, in full. With
parallel.offload_optimizer the optimizer column lives in host memory and is left out of the total.

Activations per micro batch (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", section 4; 16-bit activations, twice that for fp32), per layer:
    tp = 1:                            s b h (34 + 5 a s / h)
    tp = t, sequence parallelism:      s b h (34 / t + 5 a s / (h t))
    tp = t, no sequence parallelism:   s b h (10 + 24 / t + 5 a s / (h t))
    selective (train.activation_checkpointing=attention): the same without the 5 a s / h term
    full (train.activation_checkpointing=full): 2 s b h (the layer input; / t under sequence
        parallelism) per layer, plus one layer's activations while its backward recomputes it
with s = data.seq_len, b = train.micro_batch_size, h = model.d_model, a = model.n_heads,
t = parallel.tp. The 5 a s / h term (attention scores, softmax, its dropout mask) is left out
where Forge's attention runs through SDPA (causal, sliding, local: flash / memory-efficient
kernels, which never store the s x s scores; linear attention is O(s)) and kept only with
model.attn_softcap (an explicit fp32 softmax), or with a model.attention_softmax other than softmax
when s <= model.attention_chunk (one chunk of explicit scores, kept for backward; longer sequences
keep only each chunk's inputs and recompute its scores in backward: no s x s term). The formula
is Korthikanti's GPT block (4h MLP, multi-head attention): GLU MLPs, GQA and MoE's top-k
experts per token move the 34 by a few s b h, not modelled. Pipeline (1F1B): stage p holds min(pp - p, train.grad_accum) micro batches
in flight (Korthikanti 4.2, Megatron-LM), its layers' activations times that. The stage holding
the head adds the fp32 logits, 4 s b V / t bytes (V = padded vocabulary).

Build peak (a rank-local build: each rank holds its shard and draws each tensor's values in
blocks of rows through one scratch buffer): fp32 bytes of the rank's parameters (its 1 / dp
partition under ZeRO 3) plus build_transient_bytes (the scratch block, or a structured token table
built whole; under ZeRO 3 also the largest tensor it holds, whole before it is partitioned).
Total = weights + grads + optimizer + activations + module buffers; a rank fits when its total and
its build peak are <= --gpu-mem.

Not modelled: the activations of ssm (Mamba-2) layers, which the same per-layer formula stands in for
(their parameters and shards are counted like any layer's); DeepSpeed's communication buckets (reduce_bucket_size, allgather_bucket_size), ZeRO
3's gathered and prefetched parameters during forward and backward, the CUDA context, caching
allocator fragmentation, NCCL / cuBLAS workspaces.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from forge.config import ConfigError, JobConfig, add_config_arguments, config_arguments, load_config

GiB = 2 ** 30
LOW_PRECISION = ("bf16", "fp16")


# ---------------------------------------------------------------- what one built layer holds
@dataclass(frozen=True)
class _Param:
    numel: int
    full: int                   # elements of the whole tensor (every tp shard, every expert)
    tp_split: bool              # a tp shard (carries partition_dim); else whole on every tp rank
    expert: bool
    owned_rows: Optional[float] = None   # a vocabulary shard: fraction of its rows < vocab_size
    states: float = 2           # fp32 optimizer states per element (forge.train.optimizers.state_count)
    built_whole: bool = False   # initialised at its full shape (a structured token table, model.embed_init)


@dataclass(frozen=True)
class _Layer:
    name: str                   # DeepSpeed's name for it: the LayerSpec's class name
    params: tuple[_Param, ...]
    buffer_bytes: int
    tied: Optional[str] = None  # TiedLayerSpec key
    block: Optional[int] = None  # transformer layer index

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params)


def _params_of(module, m, tp: int, tp_rank: int, ep: int, optim=None) -> tuple[_Param, ...]:
    """What `module` (built for tp rank `tp_rank` of `tp`, ep size `ep`; `m` the ModelConfig) holds."""
    from forge.models.init import EMBED_TABLE
    from forge.parallel.sharding import VOCAB_TENSORS
    from forge.train.optimizers import state_count
    counts = state_count(module, optim) if optim is not None else {}
    out = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        split, expert = getattr(p, "partition_dim", None) is not None, bool(getattr(p, "expert", False))
        full = p.numel() * (tp if split else 1) * (ep if expert else 1)
        owned = None
        if split and name in VOCAB_TENSORS:      # rows [tp_rank * local, (tp_rank + 1) * local)
            local = p.shape[0]
            owned = min(max(m.vocab_size - tp_rank * local, 0), local) / local
        whole = m.embed_init != "gaussian" and EMBED_TABLE in (name, name.split(".", 1)[-1])
        out.append(_Param(p.numel(), full, split, expert, owned, counts.get(id(p), 2), whole))
    return tuple(out)


def build_transient_bytes(held, zero_stage: int) -> int:
    """What a rank-local build holds beyond the rank's shards (forge.models.init): the init's
    scratch block (BLOCK fp32 elements) or a structured token table built whole, whichever is
    larger, plus under ZeRO 3 the largest tensor it holds whole (tp-local) before it is partitioned."""
    from forge.models.init import BLOCK
    scratch = max([BLOCK] + [q.full for q in held if q.built_whole])
    return 4 * scratch + (4 * max((q.numel for q in held), default=0) if zero_stage == 3 else 0)


def _build_layers(cfg: JobConfig, groups) -> list[_Layer]:
    """The pipeline layer list of one (tp rank, ep rank), each kind built once on meta."""
    from deepspeed.pipe import TiedLayerSpec
    from forge.models.layers.moe import is_moe_layer
    from forge.layout.pipeline import BlockPipe, pipeline_specs
    m = cfg.model
    specs = pipeline_specs(m, groups.context(cfg.parallel.sequence_parallel))
    built: dict[tuple, tuple] = {}
    layers = []
    for spec in specs:
        block = spec.module_args[0].index if spec.typename is BlockPipe else None
        kind = (spec.typename, None if block is None else (m.layer_attention(block), m.layer_position(block),
                                                           is_moe_layer(m, block)))
        if kind not in built:
            try:
                with torch.device("meta"):
                    module = spec.build()
            except ValueError as e:          # a shape the layout cannot split
                raise ConfigError(str(e)) from None
            buffers = sum(b.numel() * b.element_size() for b in module.buffers())
            built[kind] = (_params_of(module, m, groups.tp, groups.tp_rank, groups.ep, cfg.optim), buffers)
        tied = spec.key if isinstance(spec, TiedLayerSpec) else None
        layers.append(_Layer(spec.typename.__name__, *built[kind], tied=tied, block=block))
    return layers


def stage_parts(layers: list[_Layer], pp: int, method: str) -> list[int]:
    """DeepSpeed's stage boundaries (PipelineModule._partition_layers, DeepSpeed 0.19): stage p
    holds layers[parts[p]:parts[p + 1]]."""
    method = method.lower()
    if method == "uniform":
        from deepspeed.runtime.utils import partition_uniform
        return [int(x) for x in partition_uniform(num_items=len(layers), num_parts=pp)]
    if method == "parameters":
        return _balanced(tuple(l.trainable for l in layers), pp)
    if method.startswith("type:"):
        import regex                          # DeepSpeed's own matcher (PipelineModule._find_layer_type)
        pattern = regex.compile(method.split(":")[1], regex.IGNORECASE)
        weights = tuple(1 if pattern.search(l.name) else 0 for l in layers)
        if not any(weights):
            raise ConfigError(f"parallel.pp_partition={method!r} matches none of the pipeline's layer types "
                              f"{sorted({l.name for l in layers})}")
        return _balanced(weights, pp)
    raise ConfigError(f"parallel.pp_partition={method!r} is not one of ['parameters', 'uniform', 'type:<regex>']")


@functools.lru_cache(maxsize=64)
def _balanced(weights: tuple[int, ...], pp: int) -> list[int]:
    """deepspeed.runtime.utils.partition_balanced (a dynamic programme, ~0.2 s at 83 layers x 8
    stages), once per distinct weights: every (tp rank, ep rank) usually has the same."""
    from deepspeed.runtime.utils import partition_balanced
    return [int(x) for x in partition_balanced(weights=list(weights), num_parts=pp)]


# ---------------------------------------------------------------- bytes per parameter
def state_bytes(precision: str, zero: int, pp: int, states: int = 2) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((weights, grads, optimizer) bytes per element held whole, (the same) per element split
    N ways), with `states` fp32 optimizer states per element: see the module docstring's table."""
    low = precision in LOW_PRECISION
    o = 4 + 4 * states                      # fp32 master (DeepSpeed keeps one also of fp32 weights) + states
    if zero == 0:
        return ((2, 2, 0), (0, 0, o)) if low and pp > 1 else ((4, 4, 4 * states), (0, 0, 0))
    w = 2 if low else 4
    return {1: ((w, w, 0), (0, 0, o)), 2: ((w, 0, 0), (0, w, o)), 3: ((0, 0, 0), (w, w, o))}[zero]


def _states_formula(cfg: JobConfig, dp: int, persist: int) -> str:
    """E.g. "bf16 ZeRO 1: weights 2 + grads 2 + optimizer 12/N = 4 + 12/N bytes/param (N = dp = 16)"."""
    from forge.train.optimizers import STATE_COUNT
    p, prec = cfg.parallel, cfg.train.precision
    whole, split = state_bytes(prec, p.zero_stage, p.pp, STATE_COUNT[cfg.optim.name])

    def term(w, s):
        return " + ".join(x for x in (str(w) if w else "", f"{s}/N" if s else "") if x) or "0"
    parts = " + ".join(f"{name} {term(w, s)}" for name, w, s in zip(("weights", "grads", "optimizer"), whole, split))
    n = (f"N = dp = {dp}" + (f", dp/ep = {dp // p.ep} for experts" if p.ep > 1 else "")) if any(split) else "whole"
    notes = {(0, True): "; fp32 weights under autocast", (0, False): "; DeepSpeed's BF16_Optimizer"}
    note = notes.get((p.zero_stage, p.pp == 1), "") if prec in LOW_PRECISION else ""
    if p.zero_stage == 3:
        note += f"; tensors <= {persist:,} elements also whole"
    note += {"adafactor": "; adafactor: vectors 1 state, matrices factored (not counted)",
             "muon": "; muon: its hidden matrices, AdamW's tensors 2 states",
             "soap": "; soap: (R, C) matrices 2 + 2 (R^2 + C^2) / (R C) states"}.get(cfg.optim.name, "")
    return f"{prec} ZeRO {p.zero_stage}: {parts} = {term(sum(whole), sum(split))} bytes/param ({n}{note})"


# ---------------------------------------------------------------- activations
def _activation_terms(cfg: JobConfig) -> tuple[float, float, str]:
    """(bytes one layer keeps per micro batch, bytes of one whole layer (recomputed under full
    checkpointing), formula)."""
    m, t = cfg.model, cfg.parallel.tp
    s, b, h, a = cfg.data.seq_len, cfg.train.micro_batch_size, m.d_model, m.n_heads
    sp = cfg.parallel.sequence_parallel and t > 1
    mode = cfg.train.activation_checkpointing
    scale = 2 if cfg.train.precision == "fp32" else 1
    linear, lin_txt = (34, "34") if t == 1 else ((34 / t, "34/t") if sp else (10 + 24 / t, "10 + 24/t"))
    sdpa = m.attention_softmax == "softmax" and not m.attention_sinks
    fn = m.attention_softmax + (" with sinks" if m.attention_sinks else "")
    if sdpa:
        explicit, why = m.attn_softcap is not None, "explicit softmax (attn_softcap)"
    else:       # one checkpointed chunk of queries at a time, unless one chunk holds every query
        explicit, why = s <= m.attention_chunk, f"explicit {fn} in one chunk"
    scores, sc_txt = (5 * a * s / (h * t), " + 5as/(ht)") if explicit else (0.0, "")
    whole = scale * s * b * h * (linear + scores)
    if not explicit:
        why = ("flash/SDPA: no 5as/h term" if sdpa else
               f"{fn} in checkpointed chunks of {m.attention_chunk} queries: no 5as/h term")
    if mode == "full":
        keep = scale * 2 * s * b * h / (t if sp else 1)
        return keep, whole, f"full recompute: 2sbh{'/t' if sp else ''} per layer + one layer sbh({lin_txt}{sc_txt})"
    if mode == "attention":
        return scale * s * b * h * linear, 0.0, f"selective: sbh({lin_txt}) per layer"
    return whole, 0.0, f"sbh({lin_txt}{sc_txt}) per layer ({why})"


# ---------------------------------------------------------------- the plan
@dataclass
class RankPlan:
    """One distinct shard (tp rank, pipeline stage, ep rank); `rank` and `dp_rank` are those of the
    smallest rank it covers. Bytes per rank; see the module docstring."""
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    ranks_covered: list[int]
    layers: str                 # e.g. "embed, L0-8" (pipeline layers of this stage)
    in_flight: int              # micro batches whose activations the stage holds (1F1B)
    params: int
    model_params: int
    padding_params: int
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    optim_on_host: bool
    activation_bytes: int
    buffer_bytes: int
    build_peak_bytes: int
    total_bytes: int
    fits: bool


def _layout(cfg: JobConfig, world: int) -> tuple[int, int, int, int]:
    """(tp, pp, dp, ep) of a validated config on `world` processes; ConfigError where it does not
    fit (`JobConfig.check_world`). The plan is for GPUs: fp16 is not checked against this host."""
    if world < 1:
        raise ConfigError(f"--world {world} must be >= 1")
    cfg.check_world(world)
    p = cfg.parallel
    return p.tp, p.pp, world // (p.tp * p.pp), p.ep


@contextlib.contextmanager
def _fake_rank(world: int, rank: int):
    """torch.distributed as seen by global rank `rank` of `world`, with no communication."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("forge plan builds ranks under a fake process group; torch.distributed is already "
                           "initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ranges(nums: list[int]) -> str:
    """[0, 1, 2, 8, 16, 24] -> "0-2, 8-24/8" (runs; a/step for strided ones)."""
    nums, out, i = sorted(nums), [], 0
    while i < len(nums):
        j = i + 1
        step = nums[j] - nums[i] if j < len(nums) else 1
        while j + 1 < len(nums) and nums[j + 1] - nums[j] == step:
            j += 1
        if j == i + 1 and step != 1:             # a lone pair with a gap: keep the first, retry from the second
            out.append(str(nums[i]))
            i += 1
            continue
        if j >= len(nums):
            j = len(nums) - 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}" + ("" if step == 1 else f"/{step}"))
        i = j + 1
    return ", ".join(out)


def _layer_names(layers: list[_Layer], start: int, stop: int) -> str:
    """A stage's layers, e.g. "embed, L0-8" or "L72-79, norm, head"."""
    blocks = [l.block for l in layers[start:stop] if l.block is not None]
    named = []
    for i in range(start, stop):
        l = layers[i]
        if l.block is None:
            last = "head (tied embedding)" if l.tied else "head"
            named.append("embed" if i == 0 else last if i == len(layers) - 1 else
                         "head down-projection" if l.name == "HeadDownPipe" else "norm")
        elif l.block == blocks[0]:
            named.append(f"L{blocks[0]}" + (f"-{blocks[-1]}" if len(blocks) > 1 else ""))
    return ", ".join(named)


def plan(cfg: JobConfig, world: int, gpu_mem_gib: float = 80.0) -> dict:
    """The memory plan of `cfg` on `world` ranks as a JSON-ready dict (see the module docstring)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from forge.parallel.groups import build_groups
    from forge.train.engine import build_ds_config
    tp, pp, dp, ep = _layout(cfg, world)
    p, t = cfg.parallel, cfg.train
    zero = DeepSpeedZeroConfig(**build_ds_config(cfg, dp)["zero_optimization"])    # also checks the template
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    keep, recompute, act_formula = _activation_terms(cfg)
    rates = _Rates(*state_bytes(t.precision, p.zero_stage, pp), keep, recompute,
                   persist=zero.param_persistence_threshold if p.zero_stage == 3 else 0)
    rows, parts_seen = [], set()
    for tp_rank in range(tp):
        for ep_rank in range(ep):
            with _fake_rank(world, topo.get_rank(pipe=0, data=ep_rank, model=tp_rank)):
                layers = _build_layers(cfg, build_groups(tp, pp, ep))
            parts = stage_parts(layers, pp, p.pp_partition)
            parts_seen.add(tuple(parts))
            if any(parts[i] == parts[i + 1] for i in range(pp)):
                raise ConfigError(f"parallel.pp={pp} with parallel.pp_partition={p.pp_partition!r} leaves a pipeline "
                                  f"stage without layers (stage boundaries {parts})")
            stage_of = [s for s in range(pp) for _ in range(parts[s], parts[s + 1])]
            owner = {}                                   # tied key -> its first stage (DeepSpeed's owner)
            for i, layer in enumerate(layers):
                if layer.tied:
                    owner.setdefault(layer.tied, stage_of[i])
            for stage in range(pp):
                ranks = [topo.get_rank(pipe=stage, data=d, model=tp_rank) for d in range(dp) if d % ep == ep_rank]
                rows.append(_rank_plan(cfg, layers, parts[stage], parts[stage + 1], owner, stage, tp_rank, ep_rank,
                                       ranks, rates, gpu_mem_gib))
    rows.sort(key=lambda r: r.rank)
    return {
        "layout": {"world": world, "tp": tp, "pp": pp, "dp": dp, "ep": ep, "zero_stage": p.zero_stage,
                   "precision": t.precision, "micro_batch_size": t.micro_batch_size, "seq_len": cfg.data.seq_len,
                   "grad_accum": t.grad_accum, "sequence_parallel": p.sequence_parallel and tp > 1,
                   "activation_checkpointing": t.activation_checkpointing, "pp_partition": p.pp_partition,
                   "offload_optimizer": p.offload_optimizer, "stage_parts": [list(x) for x in sorted(parts_seen)]},
        "model": cfg.model.preset,
        "params": model_params(cfg),
        "gpu_mem_gib": gpu_mem_gib,
        "formulas": {"states": _states_formula(cfg, dp, rates.persist),
                     "activations": f"Korthikanti et al. 2022, {act_formula}, x 1F1B micro batches "
                                    "in flight, + fp32 logits 4sbV/t on the head's stage",
                     "build_peak": "fp32 shard (its 1/dp partition under ZeRO 3) + the init's 16 MiB scratch "
                                   "block (+ the largest tensor held, whole, under ZeRO 3), fp32"},
        "max_total_bytes": max(r.total_bytes for r in rows),
        "fits": all(r.fits for r in rows),
        "ranks": [asdict(r) for r in rows],
    }


@dataclass(frozen=True)
class _Rates:
    whole: tuple[int, int, int]      # (weights, grads, optimizer) bytes per element held whole
    split: tuple[int, int, int]      # ... per element partitioned N ways
    keep: float                      # activation bytes one layer keeps per micro batch
    recompute: float                 # one whole layer's activations (full checkpointing's recompute)
    persist: int                     # ZeRO 3: tensors of at most this many elements stay whole


def _rank_plan(cfg, layers, start, stop, owner, stage, tp_rank, ep_rank, ranks, rates: _Rates,
               gpu_mem_gib) -> RankPlan:
    """One distinct shard: pipeline stage `stage` (layers[start:stop]) of (tp_rank, ep_rank)."""
    from forge.models.transformer import padded_vocab
    p, tr = cfg.parallel, cfg.train
    dp = len(ranks) * p.ep
    held, tied_here = [], set()
    model_count = padding = buffers = 0
    for layer in layers[start:stop]:
        if layer.tied is not None:                      # DeepSpeed builds a tied module once per stage
            if layer.tied in tied_here:
                continue
            tied_here.add(layer.tied)
        buffers += layer.buffer_bytes
        copy = layer.tied is not None and owner[layer.tied] != stage
        for q in layer.params:
            held.append(q)
            frac = 1.0 if q.owned_rows is None else q.owned_rows
            padding += round(q.numel * (1 - frac))
            if not copy and (q.expert or ep_rank == 0) and (q.tp_split or tp_rank == 0):
                model_count += round(q.numel * frac)
    states = [0, 0, 0]
    for expert in (False, True):
        group = [q for q in held if q.expert == expert]
        n = dp // p.ep if expert else dp
        numel = sum(q.numel for q in group)
        if p.zero_stage == 3:                            # each tensor partitioned on its own
            part = sum(math.ceil(q.numel / n) for q in group)
            persistent = sum(q.numel for q in group if q.numel <= rates.persist)
        else:                                            # flat buffers split in equal parts
            part, persistent = math.ceil(numel / n), 0
        for i in range(2):
            states[i] += rates.whole[i] * numel + rates.split[i] * part
        counts = {q.states for q in group}
        if len(counts) <= 1:                             # one optimizer rate for the group
            whole, split = state_bytes(cfg.train.precision, p.zero_stage, p.pp, counts.pop() if counts else 2)
            states[2] += round(whole[2] * numel + split[2] * part)
        else:                                            # muon, adafactor, soap: ZeRO 0, held whole (check_optim)
            states[2] += round(sum(state_bytes(cfg.train.precision, 0, 1, q.states)[0][2] * q.numel for q in group))
        states[0] += rates.split[0] * persistent         # ZeRO 3 keeps small tensors whole too
    params = sum(q.numel for q in held)
    in_flight = min(p.pp - stage, tr.grad_accum)
    n_blocks = sum(1 for l in layers[start:stop] if l.block is not None)
    act = in_flight * n_blocks * rates.keep + (rates.recompute if n_blocks else 0)
    if stop == len(layers):                              # the head: fp32 logits (B, T, V/tp)
        act += 4 * cfg.data.seq_len * tr.micro_batch_size * padded_vocab(cfg.model, p.tp) / p.tp
    act = int(act)
    shard = math.ceil(params / dp) if p.zero_stage == 3 else params
    build_peak = 4 * shard + build_transient_bytes(held, p.zero_stage)
    total = states[0] + states[1] + (0 if p.offload_optimizer else states[2]) + act + buffers
    return RankPlan(rank=min(ranks), tp_rank=tp_rank, pp_rank=stage, dp_rank=ep_rank, ep_rank=ep_rank,
                    ranks_covered=ranks, layers=_layer_names(layers, start, stop), in_flight=in_flight,
                    params=params, model_params=model_count, padding_params=padding, param_bytes=states[0],
                    grad_bytes=states[1], optim_bytes=states[2], optim_on_host=p.offload_optimizer,
                    activation_bytes=act, buffer_bytes=buffers, build_peak_bytes=build_peak, total_bytes=total,
                    fits=max(total, build_peak) <= gpu_mem_gib * GiB)


def model_params(cfg: JobConfig) -> int:
    """Distinct parameters of the whole model (tp = 1, tied counted once), from its layers on meta."""
    from forge.parallel.groups import ParallelGroups
    total, tied = 0, set()
    for layer in _build_layers(cfg, ParallelGroups()):
        if layer.tied not in tied:
            total += layer.trainable
        if layer.tied:
            tied.add(layer.tied)
    return total


# ---------------------------------------------------------------- output
def _count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_table(result: dict) -> str:
    L = result["layout"]
    gib = lambda b: f"{b / GiB:.2f}"   # noqa: E731
    head = (f"forge plan: world {L['world']} = tp {L['tp']} x pp {L['pp']} x dp {L['dp']} (ep {L['ep']}), "
            f"ZeRO {L['zero_stage']}, {L['precision']}, micro batch {L['micro_batch_size']} x seq {L['seq_len']}, "
            f"grad_accum {L['grad_accum']}, sequence parallel {'on' if L['sequence_parallel'] else 'off'}, "
            f"activation checkpointing {L['activation_checkpointing']}, pp_partition {L['pp_partition']}")
    f = result["formulas"]
    lines = [head,
             f"model: {result['params']:,} parameters ({result['model'] or 'custom'}; distinct, tied counted once)",
             f"states: {f['states']}",
             f"activations: {f['activations']}",
             f"build peak: {f['build_peak']}",
             "GiB per rank" + ("; optimizer states offloaded to host memory (not in total)" if L["offload_optimizer"]
                               else ""),
             ""]
    cols = ["stage", "tp rank", "ep rank", "ranks", "layers", "params", "weights", "grads", "optim", "activ",
            "total", "build peak", f"fits {result['gpu_mem_gib']:g} GiB"]
    shown = ("params", "param_bytes", "grad_bytes", "optim_bytes", "activation_bytes", "total_bytes",
             "build_peak_bytes", "fits", "layers")
    merged: dict[tuple, list[dict]] = {}
    for r in result["ranks"]:
        merged.setdefault((r["pp_rank"],) + tuple(r[k] for k in shown), []).append(r)
    table = []
    for rs in merged.values():
        r = rs[0]
        table.append([str(r["pp_rank"]), _ranges(sorted({x["tp_rank"] for x in rs})),
                      _ranges(sorted({x["ep_rank"] for x in rs})),
                      _ranges([k for x in rs for k in x["ranks_covered"]]), r["layers"], _count(r["params"]),
                      gib(r["param_bytes"]), gib(r["grad_bytes"]), gib(r["optim_bytes"]), gib(r["activation_bytes"]),
                      gib(r["total_bytes"]), gib(r["build_peak_bytes"]), "yes" if r["fits"] else "NO"])
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    left = {"ranks", "layers"}
    fmt = lambda row: "  ".join(v.ljust(w) if cols[i] in left else v.rjust(w)   # noqa: E731
                                for i, (v, w) in enumerate(zip(row, widths)))
    lines += [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(row) for row in table]
    worst = max(result["ranks"], key=lambda r: r["total_bytes"])
    lines += ["", f"largest total: {gib(worst['total_bytes'])} GiB (stage {worst['pp_rank']}, rank {worst['rank']}); "
                  f"every rank fits in {result['gpu_mem_gib']:g} GiB: {'yes' if result['fits'] else 'NO'}",
              "not modelled: DeepSpeed's communication buckets, ZeRO 3's gathered parameters, CUDA context, "
              "allocator fragmentation, NCCL/cuBLAS workspaces"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forge plan",
        description="Per-rank memory of a parallel layout (parameters, gradients, optimizer states, activations, "
                    "build peak), from every distinct rank's modules built on the meta device in this process, e.g. "
                    "`forge plan model.preset=llama3-70b parallel.tp=8 parallel.pp=8 --world 1024`.")
    add_config_arguments(p)
    p.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU to check against (default 80)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    path, overrides = config_arguments(args)
    result = plan(load_config(path, overrides), args.world, args.gpu_mem)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
