"""One training step and one evaluation on the DeepSpeed engine (plain or pipeline).

A step runs `grad_accum` micro batches of this rank: forward, next-token cross-entropy of
batch[:, :-1] -> batch[:, 1:], engine.backward (which divides the loss by grad_accum and, in fp16,
multiplies it by the loss scale) and engine.step (the optimizer steps after the last one). With a
pipeline one engine.train_batch call runs the whole schedule. The MoE auxiliary losses, which
enter backward by hand, get the same factor as the main loss.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from forge.config import JobConfig
from forge.train import checkpoint as ckpt
from forge.train import distributed as dist
from forge.train.precision import loss_scale, unscale_gradients


@contextlib.contextmanager
def preserved_rng():
    """Leave the python / numpy / torch RNG streams as they were (evaluation must not shift them)."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


def micro_loss(engine, batch) -> torch.Tensor:
    """batch: tokens (B, T + 1), or (tokens, dataset (B,)) for model.steering_datasets."""
    kw = {}
    if isinstance(batch, (tuple, list)):
        batch, dataset = batch
        kw["dataset"] = dataset.to(engine.device, non_blocking=True)
    batch = batch.to(engine.device, non_blocking=True)
    logits = engine(batch[:, :-1], **kw)
    return engine.module.loss(logits, batch[:, 1:])


def pipe_batches(it, n: int):
    """n micro batches as the (inputs, labels) pairs DeepSpeed's pipeline engine consumes."""
    for _ in range(n):
        b = next(it)
        yield b[:, :-1], b[:, 1:]


def batch_loss(engine, it, n: int, train: bool) -> float:
    """Mean loss of n micro batches: one pipeline schedule (pp > 1) or n forward passes."""
    if hasattr(engine, "train_batch"):               # PipelineEngine
        run = engine.train_batch if train else engine.eval_batch
        return float(run(data_iter=pipe_batches(it, n)))
    return sum(micro_loss(engine, next(it)).item() for _ in range(n)) / n


def train_step(engine, it, grad_accum: int, groups, clip_params: Optional[list], max_norm: float, moe: bool,
               guard=None):
    """One optimizer step; returns (this rank's mean loss over its micro batches, the global
    gradient norm or None). `clip_params`: the trainable parameters where Forge measures and
    clips the norm itself before the step (ZeRO 0, no pipeline:
    forge.train.engine.manual_clipping), None where DeepSpeed does.
    `moe`: set the auxiliary losses' gradient scale first and update the aux-loss-free biases
    after the step. `guard`: a forge.train.nonfinite.StepGuard, told the loss (and the measured
    norm) before the last engine.step, which then skips the update on every rank when either is
    not finite (guard.reason says why)."""
    from forge.models.layers.moe import set_aux_loss_scale, update_moe_biases
    from forge.parallel.grad_norm import clip_global_grad_norm
    if moe:     # the gradient the engine gives each micro batch's loss: 1/GA x the fp16 loss scale
        set_aux_loss_scale(engine.module, loss_scale(engine) / grad_accum)
    grad_norm = None
    if groups.pp > 1:                           # one pipeline schedule over the micro batches
        loss = batch_loss(engine, it, grad_accum, train=True)
    else:
        losses = []
        for micro in range(grad_accum):
            out = micro_loss(engine, next(it))
            engine.backward(out)
            losses.append(out.detach().float())
            if micro == grad_accum - 1:
                loss = float(sum(losses)) / grad_accum      # read once per step: one host sync
                if guard is not None:
                    guard.note_loss(loss)
                if clip_params is not None:
                    unscale_gradients(engine)       # fp16: the norm of the true gradients
                    grad_norm = float(clip_global_grad_norm(clip_params, max_norm, groups))
                    if guard is not None:
                        guard.note_grad_norm(grad_norm)
            engine.step()
    if grad_norm is None:
        g = engine.get_global_grad_norm()
        grad_norm = float(g) if g is not None else None
    if moe:
        update_moe_biases(engine.module, groups.dp_group)
    return loss, grad_norm


def evaluate(engine, valid, cfg: JobConfig, dp_rank: int, dp_size: int) -> Optional[float]:
    """Mean validation loss over the first `train.eval_steps` global batches of the valid split
    (the same sequences at every evaluation); None when there is no validation data."""
    from forge.data import batch_iterator
    B = cfg.train.micro_batch_size
    if valid is None or len(valid) == 0 or cfg.train.eval_steps <= 0:
        return None
    n = min(cfg.train.eval_steps, max(1, math.ceil(len(valid) / (B * dp_size))))
    if hasattr(engine, "eval_batch"):                 # a pipeline evaluates grad_accum micro batches at once
        n = max(1, n // cfg.train.grad_accum) * cfg.train.grad_accum
    was_training = engine.training
    with preserved_rng(), torch.no_grad():
        engine.eval()
        it = batch_iterator(valid, micro_batch_size=B, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=0,
                            with_dataset=cfg.model.steering_datasets > 0)
        per = cfg.train.grad_accum if hasattr(engine, "eval_batch") else n
        mean = sum(batch_loss(engine, it, per, train=False) for _ in range(n // per)) / (n // per)
        engine.train(was_training)
    return dist.all_reduce_mean([mean])[0]
