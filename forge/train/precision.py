"""Low-precision training on DeepSpeed: how train.precision maps onto the engine (each mode is
checked by tests/test_low_precision.py against fp32).

    fp32                       fp32 weights, AdamW on them
    bf16 / fp16, ZeRO 0, pp=1  fp32 weights, forward under torch.autocast (DeepSpeed's
                               torch_autocast); fp16 adds a torch GradScaler (dynamic loss scale)
    bf16 otherwise             DeepSpeed's bf16 optimizer: bf16 weights, fp32 master copy
    fp16 otherwise             DeepSpeed's ZeRO fp16 optimizer: fp16 weights, fp32 master copy,
                               dynamic loss scale

Why autocast at ZeRO 0: DeepSpeed's own ZeRO-0 low-precision optimizer (FP16_UnfusedOptimizer)
syncs with the host for every parameter, primes AdamW with a zero-gradient step (bias
corrections one step off) and, in fp16, divides by a loss scale its backward never applied;
under autocast AdamW (fused on GPUs) steps the fp32 weights directly (measurements and the
upstream report: docs/design-notes.md). Model states cost the same 16 bytes per parameter (fp32 weights 4 + grads 4 + Adam 8,
against low-precision weights 2 + grads 2 + fp32 master 4 + Adam 8); matmuls run in bf16/fp16
either way, and gradients are reduced over dp in fp32.
"""
from __future__ import annotations

from typing import Optional

from forge import deepspeed_compat as compat
from forge.config import JobConfig


def zero0_autocast(cfg: JobConfig) -> Optional[str]:
    """The torch.autocast dtype ("bfloat16" / "float16") where low precision runs as fp32 weights
    under autocast (ZeRO stage 0 without a pipeline), else None."""
    if cfg.parallel.zero_stage == 0 and cfg.parallel.pp == 1:
        return {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.precision)
    return None


def optimizer_layout(cfg: JobConfig) -> str:
    """What a checkpoint's DeepSpeed optimizer state holds: "fp32-weights" (plain AdamW over fp32
    weights: fp32, or low precision under autocast) or "deepspeed-bf16" / "deepspeed-fp16"
    (DeepSpeed's low-precision optimizer with its fp32 master copy). One cannot load the other."""
    if cfg.train.precision == "fp32" or zero0_autocast(cfg):
        return "fp32-weights"
    return f"deepspeed-{cfg.train.precision}"


def accelerator_supports_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


def loss_scale(engine) -> float:
    """The factor the loss is multiplied by before backward in fp16 (the current dynamic loss
    scale, which the optimizer step divides the gradients by again); 1 otherwise. Whatever else
    sends gradient into backward by hand (the MoE auxiliary losses) must be scaled by it too."""
    scaler = compat.autocast_grad_scaler(engine)
    if scaler is not None:
        return float(scaler.get_scale())
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0


def loss_scaler_state(engine) -> dict | None:
    """The fp16 dynamic loss scaler's state (the GradScaler at ZeRO 0, DeepSpeed's otherwise), for
    a checkpoint; None when there is none."""
    scaler = compat.autocast_grad_scaler(engine)
    if scaler is not None:
        return {"grad_scaler": scaler.state_dict()}
    fields = compat.loss_scaler_fields(engine)
    return None if fields is None else {"deepspeed": fields}


def load_loss_scaler_state(engine, state: dict | None) -> None:
    if not state:
        return
    scaler = compat.autocast_grad_scaler(engine)
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    if "deepspeed" in state:
        compat.load_loss_scaler_fields(engine, state["deepspeed"])


def unscale_gradients(engine) -> None:
    """Divide the accumulated gradients by the fp16 loss scale before Forge measures and clips
    them (ZeRO 0 with autocast); the GradScaler's step then uses them as they are, and skips the
    step if any is inf/nan. No-op in the other modes."""
    scaler = compat.autocast_grad_scaler(engine)
    if scaler is not None:
        scaler.unscale_(engine.optimizer)
