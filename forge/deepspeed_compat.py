"""Every private DeepSpeed (and torch.distributed) piece Forge relies on, in one place.

Forge runs on DeepSpeed's public API (deepspeed.initialize, its JSON config, deepspeed.pipe,
deepspeed.zero.Init, the safe_get/safe_set utilities, ZeRO 3's documented ds_* parameter
attributes). Where that API has no way to get a behaviour Forge needs, the workaround lives
here, one function per private piece, with what it works around and which test pins the public
behaviour it buys. A DeepSpeed upgrade is checked here: `check_version` refuses a version outside
TESTED (the range the test suite runs with, pyproject.toml), once, at engine creation.

Used in place, as documented or stable DeepSpeed surface: ZeRO 3's parameter attributes (ds_id,
ds_shape, ds_numel, ds_tensor), deepspeed.utils.safe_get_*/safe_set_* (forge.layout.optim),
deepspeed.pipe and its topology (forge.layout.pipeline, forge.parallel.groups), and
deepspeed.runtime.utils.partition_uniform/partition_balanced and DeepSpeedZeroConfig (forge.plan,
which reproduces the engine's own choices).

This module imports no other Forge module (any layer may import it: forge.parallel, models,
layout and train); DeepSpeed is imported inside the functions, after `select_accelerator`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from datetime import timedelta
from typing import Callable, Iterator, Optional

import torch

TESTED = ("0.19", "0.20")       # DeepSpeed versions >= TESTED[0] and < TESTED[1]


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is outside the range Forge's workarounds are tested with."""


def select_accelerator() -> None:
    """DeepSpeed picks its accelerator when it is first imported; without CUDA make it the CPU
    (DS_ACCELERATOR=cpu, unless set), not whatever else its detection finds (mps, xpu, ...).
    Called by the `forge` command and before Forge starts DeepSpeed's process groups; a program
    that imports deepspeed itself first calls this (or sets DS_ACCELERATOR)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@functools.cache
def check_version(version: Optional[str] = None) -> str:
    """Raise DeepSpeedVersionError unless DeepSpeed `version` (default: the installed one) is in
    TESTED; returns it. Called at engine creation, so a run on an untested DeepSpeed stops before
    any step instead of training on a silently changed private path."""
    from packaging.version import Version
    if version is None:
        import deepspeed
        version = deepspeed.__version__
    v = Version(version).release
    low, high = (Version(x).release for x in TESTED)
    if not low <= v < high:
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} is installed, but Forge is tested with deepspeed>={TESTED[0]},<{TESTED[1]} "
            f"(forge.deepspeed_compat relies on its private pieces); install e.g. "
            f"pip install 'deepspeed>={TESTED[0]},<{TESTED[1]}'")
    return version


# ---------------------------------------------------------------- process groups
def set_default_group_timeout(seconds: float) -> None:
    """Make `seconds` the timeout of every process group created from now on without an explicit
    one. Works around: torch's `new_group()` takes its own default (30 min gloo, 10 min nccl), not
    the world group's, and DeepSpeed's ZeRO, pipeline and expert groups (and Forge's) are made
    that way. Private: torch.distributed.distributed_c10d's module defaults, which
    `_get_default_timeout` reads. Pinned by tests/test_hangs.py."""
    from torch.distributed import distributed_c10d as c10d
    td = timedelta(seconds=seconds)
    c10d.default_pg_timeout = td
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = td


def release_group_references() -> None:
    """Drop DeepSpeed's cached process groups. Works around: after someone destroyed the world
    group with torch.distributed directly, DeepSpeed's cache would hand out the dead groups to the
    next engine (several trainings in one process). Private: deepspeed.utils.groups.
    _release_process_group_references. Pinned by every test file that trains twice in a process."""
    try:
        from deepspeed.utils import groups
        groups._release_process_group_references(group=None)
    except Exception:       # pragma: no cover - other DeepSpeed versions
        pass


def skip_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op unavailable. Works around: its CPU
    accelerator JIT-compiles that kernel (used only by its inference all-reduce) when the comm
    backend starts; gloo does everything training needs, so nothing compiles at start. Private:
    deepspeed.ops.__compatible_ops__. Pinned by the CPU test suite's start-up (no compiler needed)."""
    try:
        import deepspeed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:       # pragma: no cover - other DeepSpeed layouts
        pass


# ---------------------------------------------------------------- parameter attributes
def tag_parameters(model: torch.nn.Module, ep: int) -> None:
    """Translate Forge's own parameter attributes into the ones DeepSpeed reads (before
    deepspeed.initialize); model code sets only Forge's:
        partition_dim (a tp shard)  -> tensor_model_parallel = True: DeepSpeed's grad norm counts
                                       it on every tp rank (a replicated one on tp rank 0 only)
        expert, with ep > 1         -> allreduce = False, group_name = "ep_size_{ep}": DeepSpeed's
                                       is_moe_param; ZeRO 1/2 reduce it over that group's
                                       expert-data-parallel ranks, not the whole data-parallel group
    At ep = 1 experts are reduced like dense parameters (no attribute). Pinned by
    tests/test_parallel_layouts.py (tp and ep layouts against one process) and
    tests/test_moe_parallel.py."""
    for p in model.parameters():
        if getattr(p, "partition_dim", None) is not None:
            p.tensor_model_parallel = True
        if ep > 1 and getattr(p, "expert", False):
            p.allreduce = False
            p.group_name = f"ep_size_{ep}"


def pipe_replicated(p) -> bool:
    """Whether `p` is a tied copy that DeepSpeed's PipelineModule replicated onto a later stage
    (its `ds_pipe_replicated` attribute): counted once in norms and checkpoints, by its owner."""
    return bool(getattr(p, "ds_pipe_replicated", False))


# ---------------------------------------------------------------- mixture of experts
def expert_parallel(params, groups):
    """(optimizer param groups, context to run deepspeed.initialize in) that let DeepSpeed reduce
    expert gradients over the expert-data-parallel group (summed, divided by the data-parallel
    size) and dense ones over the data-parallel group, pipeline stages included. Works around:
    DeepSpeed's engine recognises only its own MoE layer class. So: let DeepSpeed build its expert
    groups, check they are Forge's (ep consecutive ranks of each data-parallel group, i.e. of one
    pipeline stage and one tp rank), split experts into their own param groups, and mark the
    engine as holding MoE layers while it configures itself (`tag_parameters` gives experts
    allreduce=False and group_name).

    Groups: at tp = pp = 1 DeepSpeed's consecutive layout (_create_expert_and_data_parallel); with
    tp or pp its "expert tensor parallel" construction (_create_expert_data_and_model_parallel,
    Forge's groups as the mpu), which splits each (stage, tp rank)'s data-parallel ranks the same
    way and records expert tp = tp, so that its norms sum tp-sharded expert gradients over tp (and
    pp) and then over ep. Its ZeRO 1/2 optimizer routes expert gradients to their group only on
    the contiguous-buffer reduce-scatter path (forge.train.engine.build_ds_config sets it); its
    other path all-reduces every gradient over the whole data-parallel group, summing different
    experts that share a slot on different ep ranks. Its clip norm sums partition norms over the
    data-parallel group, which covers every expert once.

    Private: DeepSpeedEngine._configure_distributed_model (patched at class level, restored on
    exit of the context) and the deepspeed.utils.groups helpers. Pinned by
    tests/test_parallel_layouts.py (tiny-mixtral ep2 at ZeRO 0/1/2, and dp4, against one process)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups as ds_groups
    name = f"ep_size_{groups.ep}"
    if name not in ds_groups._get_expert_parallel_group_dict():
        if groups.tp == 1 and groups.pp == 1:
            ds_groups._create_expert_and_data_parallel(groups.ep)
        else:
            ds_groups._create_expert_data_and_model_parallel(groups.ep, mpu=groups)
    for what, mine, getter in (("expert", groups.ep_group, ds_groups._get_expert_parallel_group),
                               ("expert data", groups.edp_group, ds_groups._get_expert_data_parallel_group)):
        theirs = torch.distributed.get_process_group_ranks(getter(name))
        if theirs != torch.distributed.get_process_group_ranks(mine):
            raise RuntimeError(f"DeepSpeed's {what}-parallel group {theirs} differs from Forge's")

    @contextlib.contextmanager
    def engine_sees_moe():
        original = DeepSpeedEngine._configure_distributed_model

        def configure(self, model):
            original(self, model)
            self.has_moe_layers = True
        DeepSpeedEngine._configure_distributed_model = configure
        try:
            yield
        finally:
            DeepSpeedEngine._configure_distributed_model = original
    return split_params_into_different_moe_groups_for_optimizer(params), engine_sees_moe()


# ---------------------------------------------------------------- precision
def forget_autocast() -> None:
    """Reset DeepSpeed's torch_autocast process globals. Works around: DeepSpeed records an
    engine's torch_autocast there and the ZeRO optimizers of every later engine in the process
    read them, so an engine without autocast would inherit an earlier engine's fp16 loss scaling.
    Called before creating an engine without autocast. Private: deepspeed.runtime.
    torch_autocast.TORCH_AUTOCAST_INITIALIZED / TORCH_AUTOCAST_DTYPE. Pinned by
    tests/test_low_precision.py."""
    from deepspeed.runtime import torch_autocast
    torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
    torch_autocast.TORCH_AUTOCAST_DTYPE = None


def autocast_grad_scaler(engine):
    """The torch GradScaler DeepSpeed's engine keeps for fp16 torch_autocast at ZeRO 0, or None.
    Private: engine.torch_autocast_z0_gradscaler. Pinned by tests/test_low_precision.py (fp16
    matches fp32; its scale is the aux-loss factor and is checkpointed)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None)


_LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_fields(engine) -> Optional[dict]:
    """The state of DeepSpeed's fp16 dynamic loss scaler (its optimizer's `loss_scaler`), which
    its checkpoints keep only inside the optimizer state Forge does not use; None without one.
    Private: DynamicLossScaler's fields. Pinned by tests/test_low_precision.py (fp16 resume)."""
    ds = getattr(engine.optimizer, "loss_scaler", None) if engine.fp16_enabled() else None
    if ds is None:
        return None
    return {k: getattr(ds, k) for k in _LOSS_SCALER_FIELDS if hasattr(ds, k)}


def load_loss_scaler_fields(engine, fields: dict) -> None:
    ds = getattr(engine.optimizer, "loss_scaler", None)
    if ds is not None:
        for k, v in fields.items():
            setattr(ds, k, v)


# ---------------------------------------------------------------- the optimizer step
def replace_pipeline_clipping(engine, clip: Callable[[], float]) -> None:
    """Make the pipeline engine's fp32 clipping call `clip()` (which clips and returns the global
    norm) and report its norm through get_global_grad_norm. Works around: DeepSpeed's fp32
    pipeline clipping counts only the first stage's replicated parameters in the norm. Private:
    the instance's clip_fp32_gradients and its `_global_grad_norm`. Pinned by
    tests/test_parallel_layouts.py (pp=2 fp32 clipping equals one process)."""
    def clip_fp32_gradients():
        engine._global_grad_norm = float(clip())
    engine.clip_fp32_gradients = clip_fp32_gradients


def wrap_model_step(engine, before: Callable[[], None], after: Callable[[], None]) -> None:
    """Run `before()` and, whatever happens, `after()` around the engine's update at the
    accumulation boundary: the one method both engine.step and the pipeline's OptimizerStep call,
    on every rank. Works around: DeepSpeed has no hook there (Forge decides there, on every rank
    alike, whether a non-finite step is applied). Private: engine._take_model_step. Pinned by
    tests/test_nonfinite.py."""
    original = engine._take_model_step

    def take_model_step(*args, **kwargs):
        before()
        try:
            return original(*args, **kwargs)
        finally:
            after()
    engine._take_model_step = take_model_step


def optimizer_overflowed(engine) -> bool:
    """Whether DeepSpeed's ZeRO / bf16 / fp16 optimizer skipped its last step for an invalid
    gradient norm (fp16: a loss-scale overflow). Private: the optimizer's `overflow` flag. Pinned
    by tests/test_nonfinite.py."""
    return bool(getattr(engine.optimizer, "overflow", False))


def pipeline_loss(engine) -> Optional[float]:
    """The pipeline engine's summed loss of this step's micro batches on the last stage (None on
    other stages, or before a step). Private: engine.total_loss. Pinned by tests/test_nonfinite.py
    (a non-finite loss in a pipeline is skipped on every rank)."""
    t = getattr(engine, "total_loss", None)
    if t is None or isinstance(t, (list, tuple)):
        return None
    return float(t.detach().float().sum())


def zero3_fp32_groups(optimizer) -> Optional[list]:
    """A ZeRO 3 optimizer's flat fp32 partitions (which it hands to its inner torch optimizer only
    while it steps), None for other optimizers. Private: fp32_partitioned_groups_flat."""
    return getattr(optimizer, "fp32_partitioned_groups_flat", None)


def fp32_partitions(optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the flat fp32 master partitions a ZeRO optimizer holds outside its torch
    optimizer's param groups. Private: fp32_partitioned_groups_flat (ZeRO 3) and
    single_partition_of_fp32_groups (ZeRO 1/2). Pinned by tests/test_nonfinite.py."""
    for i, p in enumerate(zero3_fp32_groups(optimizer) or []):
        yield f"ZeRO-3 fp32 partition {i}", p
    for i, p in enumerate(getattr(optimizer, "single_partition_of_fp32_groups", None) or []):
        yield f"ZeRO fp32 partition {i}", p


# ---------------------------------------------------------------- ZeRO 1/2 fragments (checkpoints)
def has_fragment_mapping(p) -> bool:
    """Whether `p` is mapped onto a ZeRO 1/2 or bf16 optimizer's flat fp32 partitions
    (DeepSpeed's private `_hp_mapping`; None where this rank holds no fragment of it)."""
    return hasattr(p, "_hp_mapping")


def holds_fragment(p) -> bool:
    """Whether this data-parallel rank updates a fragment of `p` (ZeRO 1/2, bf16 optimizer)."""
    return getattr(p, "_hp_mapping", None) is not None


def fragment(p, key: Optional[str]) -> Optional[tuple[torch.Tensor, int]]:
    """(this data-parallel rank's fragment of `p`'s fp32 master (key None) or optimizer state
    `key`, its start in the flattened tensor), or None where the rank holds none. Private:
    `_hp_mapping.get_hp_fragment` / `lp_fragment_address` (DeepSpeed's safe_get_* return the full
    tensor, gathered). Pinned by tests/test_resume_relayout.py (resuming ZeRO 1/2 state under another layout)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.get_hp_fragment(key), mapping.lp_fragment_address.start


def link_fragments(optimizer) -> None:
    """Link a ZeRO 1/2 optimizer's fragments to its Adam state. Works around: DeepSpeed links
    them lazily after the first step, so a checkpoint written (or loaded) before one would see no
    state. Private: _hp_optimizer_states_linked / _lazy_init_hp_params_optimizer_state."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
