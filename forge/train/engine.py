"""The DeepSpeed engine: its JSON config derived from the Forge config, and `deepspeed.initialize`.

Forge owns the keys it derives (batch sizes, precision, ZeRO stage, clipping, AdamW); a template
named by `parallel.ds_config` (a JSON file, e.g. ds_configs/zero2.json) supplies DeepSpeed-only
settings such as bucket sizes and is merged underneath, so Forge's values win on shared keys.

AdamW (optim.name=adamw) is always PyTorch's (`"torch_adam": true`), so nothing is compiled when the
engine starts; the other optimizers (forge.train.optimizers) are built by Forge and handed to
`deepspeed.initialize(optimizer=...)`, and the DeepSpeed config then has no "optimizer" entry.
Weight decay applies to matrices (embeddings unless optim.decay_embeddings=false); norms and biases
are not decayed.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch

from forge import deepspeed_compat as compat
from forge.config import ConfigError, JobConfig, flatten_dict, merge_dicts
from forge.train.precision import accelerator_supports_fp16, zero0_autocast
from forge.train.schedule import ForgeLRScheduler


def load_template(path: str) -> dict:
    candidates = [path]
    if not os.path.isabs(path):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        candidates += [os.path.join(root, path), os.path.join(root, "ds_configs", path)]
    for p in candidates:
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    tree = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"parallel.ds_config={path!r} is not valid JSON: {e}") from None
            if not isinstance(tree, dict):
                raise ConfigError(f"parallel.ds_config={path!r} must hold a JSON object")
            return tree
    raise ConfigError(f"parallel.ds_config={path!r} does not exist")


def manual_clipping(cfg: JobConfig) -> bool:
    """True where Forge clips (and measures) the global gradient norm itself: ZeRO stage 0 without
    a pipeline (fp32 weights, also under autocast), where DeepSpeed clips without reporting the
    norm. Elsewhere DeepSpeed's optimizer (or pipeline engine) does both, over the tp/pp groups
    it is given."""
    return cfg.parallel.zero_stage == 0 and cfg.parallel.pp == 1


def check_supported(cfg: JobConfig, world: int | None = None) -> None:
    """What the config cannot know, raised before any work: the world size fits the layout
    (`JobConfig.check_world`) and this machine's DeepSpeed accelerator runs the precision. Every
    other check is in `JobConfig.validate`."""
    if world is not None:
        cfg.check_world(world)
    if cfg.train.precision == "fp16" and not accelerator_supports_fp16():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed's accelerator here does not support "
                          "fp16); use bf16 or fp32 on CPU")


FORGE_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "gradient_clipping", "zero_optimization.stage", "bf16.", "fp16.enabled", "optimizer.",
               "torch_autocast.")


def check_template(template: dict, derived: dict, name: str | None) -> None:
    """A template may add DeepSpeed-only settings but not contradict what Forge derives."""
    flat_t, flat_d = flatten_dict(template), flatten_dict(derived)
    owned = [k for k in set(flat_t) & set(flat_d) if k.startswith(FORGE_OWNED)]
    if "offload_optimizer" in template.get("zero_optimization", {}) and "offload_optimizer" not in derived["zero_optimization"]:
        raise ConfigError(f"parallel.ds_config={name!r} offloads the optimizer, but parallel.offload_optimizer is "
                          "false; set parallel.offload_optimizer=true")
    for key in sorted(owned):
        if flat_t[key] != flat_d[key]:
            raise ConfigError(f"parallel.ds_config={name!r} sets {key}={flat_t[key]!r}, but the Forge config gives "
                              f"{flat_d[key]!r} (set it through the Forge config, e.g. parallel.zero_stage, "
                              "train.micro_batch_size, train.precision, optim.*)")


def build_ds_config(cfg: JobConfig, dp_size: int) -> dict[str, Any]:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    autocast = zero0_autocast(cfg)
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage > 0:
        # no side streams on CPU; contiguous buffers and overlap only pay off on GPUs
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=torch.cuda.is_available())
        if p.ep > 1:
            # required with expert parallelism, on CPU too (and over a template's values): only
            # this path reduces expert gradients over their own group (forge.deepspeed_compat.expert_parallel)
            zero.update(contiguous_gradients=True, reduce_scatter=True)
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    adam = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True, "adam_w_mode": True}
    if torch.cuda.is_available() and not p.offload_optimizer:
        adam["fused"] = True
    derived = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": 0.0 if manual_clipping(cfg) else o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16" and not autocast},
        "fp16": {"enabled": t.precision == "fp16" and not autocast},
        # fp32 weights, low-precision matmuls (forge.train.precision); gradients reduced in fp32
        "torch_autocast": {"enabled": bool(autocast), "dtype": autocast or "bfloat16",
                           "lower_precision_safe_modules": []},
        **({"optimizer": {"type": "AdamW", "params": adam}} if o.name == "adamw" else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    base = load_template(p.ds_config) if p.ds_config else {}
    base.pop("scheduler", None)         # Forge drives the learning rate
    if o.name != "adamw" and "optimizer" in base:
        raise ConfigError(f"parallel.ds_config={p.ds_config!r} configures an optimizer, but optim.name={o.name!r} "
                          "is built by Forge; drop the template's \"optimizer\" entry")
    check_template(base, derived, p.ds_config)
    return merge_dicts(base, derived)


def create_engine(cfg: JobConfig, model: torch.nn.Module, groups):
    """`deepspeed.initialize` with the derived config and Forge's lr schedule; returns the engine.
    Without a pipeline DeepSpeed gets `groups` as its mpu; a PipelineModule carries the topology
    itself (DeepSpeed refuses an mpu there)."""
    import deepspeed
    compat.check_version()
    ds_config = build_ds_config(cfg, groups.dp)
    mpu = groups if groups.pp == 1 and groups.tp * groups.dp > 1 else None
    from forge.train.optimizers import build_client_optimizer, param_groups
    compat.tag_parameters(model, groups.ep)
    params = param_groups(model, cfg.optim)
    if not zero0_autocast(cfg):
        compat.forget_autocast()
    moe = contextlib.nullcontext()
    if groups.ep > 1:
        params, moe = compat.expert_parallel(params, groups)
    with moe:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=build_client_optimizer(params, cfg.optim),
            config=ds_config,
            mpu=mpu,
            lr_scheduler=lambda opt: ForgeLRScheduler(opt, cfg.optim, cfg.train.max_steps),
        )
    if groups.pp > 1 and cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32" and cfg.optim.grad_clip > 0:
        _clip_pipeline_globally(engine, cfg.optim.grad_clip, groups)
    if cfg.train.compile:
        engine.compile()
    return engine


@contextlib.contextmanager
def compile_determinism(cfg: JobConfig):
    """With train.compile on CPU: torch's deterministic-algorithms mode (warn_only, and without
    filling new tensors with NaN) while the block runs, for the compilations that happen lazily
    inside it (the first step, the first evaluation, any recompilation).

    Why: Inductor lowers the embedding's backward (embedding_dense_backward = index_put with
    accumulate) to an OpenMP loop of atomic adds, whose float sums come in a different order from
    run to run, so a run and its resume would differ; in this mode Inductor calls ATen's
    index_put_ instead, serial and deterministic on CPU (every other kernel already is;
    docs/design-notes.md). GPUs are left
    alone (the mode there also changes cuBLAS, scatter and attention kernels); their compiled runs
    are not bit-exact from run to run."""
    if not cfg.train.compile or torch.cuda.is_available():
        yield
        return
    import torch.utils.deterministic as det
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        det.fill_uninitialized_memory = old[2]


def _clip_pipeline_globally(engine, max_norm: float, groups) -> None:
    """DeepSpeed's fp32 pipeline clipping counts only the first stage's replicated parameters in
    the norm; clip over every stage and tp rank instead (forge.parallel.grad_norm.global_grad_norm)."""
    from forge.parallel.grad_norm import clip_global_grad_norm
    params = [p for p in engine.module.parameters() if p.requires_grad]
    compat.replace_pipeline_clipping(engine, lambda: clip_global_grad_norm(params, max_norm, groups))
