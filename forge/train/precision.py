"""Low-precision training on DeepSpeed: how train.precision maps onto the engine, and the
workarounds for DeepSpeed 0.19's ZeRO-0 fp16/bf16 optimizer (each checked by
tests/test_low_precision.py against fp32).

    fp32                 fp32 weights, AdamW on them
    bf16, ZeRO 0, pp=1   fp32 weights, forward under bf16 autocast (bf16_autocast)
    bf16 otherwise       DeepSpeed's bf16 optimizer: bf16 weights, fp32 master copy
    fp16                 DeepSpeed's fp16 optimizer with dynamic loss scaling (backward)
"""
from __future__ import annotations

import torch

from forge.config import JobConfig


def bf16_autocast(cfg: JobConfig) -> bool:
    """True where train.precision=bf16 runs as fp32 weights under bf16 autocast: ZeRO stage 0
    without a pipeline. DeepSpeed's own bf16 at ZeRO 0 wraps AdamW in its FP16_UnfusedOptimizer,
    which converts, checks and norms every parameter separately with host syncs (about 120
    cudaStreamSynchronize per step for a 12-layer model): on an H200 the engine then reached 53%
    of the plain loop's tokens/s. With autocast DeepSpeed's forward runs under
    torch.autocast(bfloat16) and steps (fused) AdamW on the fp32 weights directly. Model states
    cost the same 16 bytes per parameter (fp32 weights 4 + fp32 grads 4 + Adam 8, against bf16
    weights 2 + grads 2 + fp32 master 4 + Adam 8); matmuls run in bf16 either way, and the
    gradients are reduced over dp in fp32."""
    return cfg.train.precision == "bf16" and cfg.parallel.zero_stage == 0 and cfg.parallel.pp == 1


def accelerator_supports_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


def unprime_low_precision_optimizer(engine) -> None:
    """Undo the zero-gradient step that DeepSpeed's FP16_UnfusedOptimizer (fp16 at ZeRO stage 0;
    bf16 there would use it too, but runs as autocast) takes at construction to create the
    optimizer state: that step leaves AdamW's step
    count at 1, so every later bias correction is one step off and the first updates come out
    ~0.7x too small (losses visibly behind fp32 and ZeRO 1 after one step), and it applies weight
    decay once at the peak lr. The state is dropped (AdamW recreates it at the first real step)
    and the fp32 master weights are copied again from the unchanged low-precision weights they
    were cloned from."""
    opt = engine.optimizer
    if type(opt).__name__ != "FP16_UnfusedOptimizer":
        return
    opt.optimizer.state.clear()
    with torch.no_grad():
        for masters, weights in zip(opt.fp32_groups, opt.fp16_groups):
            for master, weight in zip(masters, weights):
                master.copy_(weight)


def grad_norm(engine):
    """The global gradient norm of the last step as DeepSpeed measured it (None if it did not),
    unscaled: DeepSpeed's ZeRO-0 fp16 optimizer reports the norm of the loss-scaled gradients."""
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    g = float(g)
    if engine.fp16_enabled() and hasattr(engine.optimizer, "loss_scale_config") and not _is_zero(engine.optimizer):
        g /= float(engine.optimizer.loss_scale_config.cur_scale)
    return g


def _is_zero(optimizer) -> bool:
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    return isinstance(optimizer, ZeROOptimizer)


def backward(engine, loss: torch.Tensor, check: bool = False) -> None:
    """engine.backward(loss), with the fp16 loss scale applied where DeepSpeed forgets it.

    DeepSpeed 0.19 scales the loss inside engine.backward only for its ZeRO optimizers; at fp16
    with ZeRO stage 0 it calls loss.backward() on the unscaled loss while its FP16 optimizer still
    divides the gradients by the loss scale S in step() (deepspeedai/DeepSpeed PR 8393), so every
    update is S (65536 at start) times too small and fp16 underflows are never caught. Here the
    loss is multiplied by S first. With `check`, a hook on the loss verifies that the gradient
    reaching it is S / grad_accum, i.e. DeepSpeed applied no second scale (a later DeepSpeed that
    fixes its side would otherwise square S): a mismatch raises instead of training wrongly."""
    scale = None
    if engine.fp16_enabled() and not _is_zero(engine.optimizer):
        scale = float(engine.optimizer.loss_scale_config.cur_scale)
    if scale is None:
        engine.backward(loss)
        return
    seen = []
    hook = loss.register_hook(lambda g: seen.append(float(g))) if check else None
    engine.backward(loss * scale)
    if hook is not None:
        hook.remove()
        expected = scale / engine.gradient_accumulation_steps()
        if not seen or abs(seen[0] / expected - 1) > 1e-3:
            raise RuntimeError(f"fp16 loss scaling: the loss received gradient {seen[0] if seen else None}, expected "
                               f"loss_scale / grad_accum = {expected}; this DeepSpeed scales the ZeRO-0 fp16 loss "
                               "itself, so forge.train.engine.backward must stop scaling it")


def loss_scale(engine) -> float:
    """The factor the loss is multiplied by before backward in fp16 (DeepSpeed's current dynamic
    loss scale, which its optimizers divide the gradients by again); 1 otherwise. Whatever else
    sends gradient into backward by hand (the MoE auxiliary losses) must be scaled by it too."""
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0
