"""This rank's optimizer state in a sharded checkpoint, readable by any layout.

For each parameter, the optimizer's state (`state_keys`: Adam's exp_avg and exp_avg_sq, Lion's
exp_avg, SGD's and Muon's momentum_buffer, Adafactor's row_var/col_var or variance; see
forge.train.optimizers) and the fp32 master copy where the module's weights are bf16/fp16 are
stored as parts of global tensors in the format of the weights (forge.models.sharded):
`step_*/optim/forge_index.json` + `shard-{rank}.safetensors`, tensors "{name}::exp_avg",
"{name}::exp_avg_sq", "{name}::fp32" (Forge names, global shapes). A state shaped unlike its
parameter (Adafactor's factored rows and columns; tp = 1 only) is stored whole, as its own tensor.
The part a rank holds depends on the engine's optimizer:

    torch    Forge's AdamW itself (ZeRO 0, and a pipeline's fp32 ZeRO 0): the state of the rank's
             whole tensor, a box (written by data-parallel rank 0, or the first replica of experts)
    frag     DeepSpeed's ZeRO 1/2 and bf16 optimizers: the fragment [start, start + n) of the
             flattened tp shard that this data-parallel rank updates (param._hp_mapping), a flat range
    zero3    ZeRO 3: the rank's partition of the flattened tp shard, a flat range
Every data-parallel rank writes its own fragment or partition: nothing is gathered. Reading
(`load_rank_optimizer`) assembles the rank's whole tp box of each tensor from whatever parts the
writing layout left, then keeps what its own optimizer holds (DeepSpeed's safe_set_* utilities
for frag and zero3). The Adam step count is one number (`optimizer_step`).
DeepSpeed's private fragment mapping is read through forge.deepspeed_compat (`fragment`,
`link_fragments`); the flat fp32 partitions' state is read in its inner torch optimizer.
"""
from __future__ import annotations

import torch

from forge import deepspeed_compat as compat
from forge.layout.weights import box_part, flat_part, rank_boxes, writes_whole, zero3_range
from forge.models.sharded import Part, WeightReader
from forge.parallel.groups import ParallelGroups

MOMENTS = ("exp_avg", "exp_avg_sq")


def state_keys(inner, p) -> dict:
    """{state key: shape} that the torch optimizer `inner` keeps for parameter `p`: Forge's
    optimizers say (`state_shapes`), DeepSpeed's AdamW keeps Adam's moments."""
    shapes = getattr(inner, "state_shapes", None)
    shape = tuple(getattr(p, "ds_shape", p.shape))
    return shapes(p) if shapes is not None else {k: shape for k in MOMENTS}


def optimizer_kind(engine) -> str:
    params = list(engine.module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if any(compat.has_fragment_mapping(p) for p in params):
        return "frag"
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return "torch"
    raise TypeError(f"no sharded optimizer state for DeepSpeed's {type(engine.optimizer).__name__}")


def _inner(engine):
    """The torch optimizer under a DeepSpeed optimizer wrapper (or the optimizer itself)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def low_precision(engine) -> bool:
    """Whether the module's weights are bf16/fp16 (the optimizer then holds fp32 masters)."""
    return next(engine.module.parameters()).dtype != torch.float32


def optimizer_step(engine) -> int:
    """The optimizer's step count (the same for every parameter; 0 for those without one)."""
    for state in _inner(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _ensure_state(engine, step: int) -> None:
    """Adam creates its state at the first step: create it (zeros) so it can be filled (for
    DeepSpeed's optimizers: the state of its flat fp32 partitions)."""
    inner = _inner(engine)
    # ZeRO 3 hands its flat fp32 groups to the inner optimizer only while it steps
    flat = compat.zero3_fp32_groups(engine.optimizer)
    for p in flat if flat is not None else [p for group in inner.param_groups for p in group["params"]]:
        state = inner.state[p]
        for key, shape in state_keys(inner, p).items():
            if key not in state:
                state[key] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        if isinstance(inner, torch.optim.SGD):
            continue                        # no step count
        state["step"] = torch.tensor(float(step)) if not torch.is_tensor(state.get("step")) else \
            state["step"].fill_(step)


def rank_optimizer_parts(engine, cfg, groups: ParallelGroups, name_of, masters: bool) -> list[Part]:
    """The optimizer-state parts this rank writes (see the module docstring); masters: with the
    fp32 master weights (the module's weights are bf16/fp16, `low_precision`)."""
    kind = optimizer_kind(engine)
    if kind == "frag":
        compat.link_fragments(engine.optimizer)
    inner = _inner(engine)
    parts = []
    for b in _trained(engine, cfg, groups, name_of):
        p = b.tensor
        shapes = state_keys(inner, p)
        for key in tuple(shapes) + (("fp32",) if masters else ()):
            name = f"{b.name}::{key}"
            if kind == "torch":
                if not writes_whole(p, groups):
                    continue
                value = (p.detach() if key == "fp32" else inner.state[p][key]).float()
                if key != "fp32" and tuple(value.shape) != tuple(p.shape):    # stored whole (tp = 1)
                    parts.append(Part(name, value.contiguous(), tuple(value.shape), (0,) * value.dim(),
                                      tuple(value.shape)))
                else:
                    parts.append(box_part(b, value, name))
            elif kind == "frag":
                frag = compat.fragment(p, None if key == "fp32" else key)
                if frag is not None and writes_fragment(p, groups):
                    value, start = frag
                    parts.append(flat_part(b, value.detach().float().view(-1), start, name))
            else:
                from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
                a, e = zero3_range(p, groups)
                if a < e and writes_fragment(p, groups):
                    value = safe_get_local_fp32_param(p) if key == "fp32" else safe_get_local_optimizer_state(p, key)
                    parts.append(flat_part(b, value.detach().float().view(-1)[:e - a], a, name))
    return parts


def writes_fragment(p, groups: ParallelGroups) -> bool:
    """A data-parallel fragment is written by every data-parallel rank, except copies that the
    layout replicates: over tp (no partition_dim: tp rank 0 writes) and a pipeline's tied copy."""
    if compat.pipe_replicated(p):
        return False
    return getattr(p, "partition_dim", None) is not None or groups.tp_rank == 0


def _trained(engine, cfg, groups, name_of):
    return [b for b in rank_boxes(engine.module, cfg, groups, name_of)
            if isinstance(b.tensor, torch.nn.Parameter) and b.tensor.requires_grad]


@torch.no_grad()
def load_rank_optimizer(engine, cfg, groups: ParallelGroups, folder: str, model_folder: str, name_of,
                        step: int) -> None:
    """Fill this rank's optimizer state and fp32 masters from a sharded checkpoint written under
    any layout (`folder`: its optim/, `model_folder`: its model/, whose weights are the masters
    when they were trained in fp32); Adam's step count becomes `step`."""
    kind = optimizer_kind(engine)
    _ensure_state(engine, step)
    if kind == "frag":
        compat.link_fragments(engine.optimizer)
    inner = _inner(engine)
    with WeightReader(folder) as reader, WeightReader(model_folder) as weights:
        stored = set(reader.names())
        for b in _trained(engine, cfg, groups, name_of):
            p = b.tensor
            shapes = state_keys(inner, p)
            for key in tuple(shapes) + ("fp32",):
                name = f"{b.name}::{key}"
                if kind == "torch" and key == "fp32" and name not in stored:
                    continue                # the fp32 weights are the master: load_rank_weights read them
                source = reader if name in stored else weights if key == "fp32" else None
                if source is None:
                    raise ValueError(f"{folder}: no optimizer state {name!r}")
                if key != "fp32" and shapes[key] != tuple(b.local):                # stored whole (tp = 1)
                    value = reader.get_box(name, (0,) * len(shapes[key]), shapes[key])
                    reader.close()
                    inner.state[p][key].copy_(value)
                    continue
                whole = torch.zeros(b.local, dtype=torch.float32)   # the rank's tp box, padding rows 0
                whole[tuple(slice(0, n) for n in b.box)] = source.get_box(name if source is reader else b.name,
                                                                           b.start, b.box)
                source.close()              # unmap what was read: mapped pages count as resident
                _set(kind, engine, inner, p, key, whole.to(p.device), groups)


def _set(kind, engine, inner, p, key, whole, groups):
    if kind == "torch":
        if key == "fp32":
            p.copy_(whole.to(p.dtype))
        else:
            inner.state[p][key].copy_(whole)
    elif kind == "frag":
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        if not compat.holds_fragment(p):
            return
        if key == "fp32":
            safe_set_full_fp32_param(p, whole)
        else:
            safe_set_full_optimizer_state(p, whole, key)
    else:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
        a, e = zero3_range(p, groups)
        local = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=whole.device)
        local[:e - a] = whole.reshape(-1)[a:e]
        if key == "fp32":
            safe_set_local_fp32_param(p, local)
        else:
            safe_set_local_optimizer_state(p, local, key)
