"""Non-finite steps: a step whose loss or global gradient norm is inf/NaN is skipped on every rank.

Invariant: an optimizer step is applied on every rank or on none, and a skipped step leaves the
weights, the fp32 masters and the optimizer state (Adam's moments and its step count) bit-equal
to what they were before it; its gradients are dropped. The step still counts: the data moves on
and the lr schedule (a function of the step number, forge.train.schedule) advances, as a resumed
run would have it. `train.max_skipped_steps` skipped steps in a row raise NonFiniteError (the run
stops with no checkpoint of that step), and `check_finite_weights` refuses to save a checkpoint
whose weights or optimizer state hold a non-finite value.

How the decision is made (`StepGuard`, installed on the engine once; the DeepSpeed internals it
reads and wraps are in forge.deepspeed_compat):

    the model step            DeepSpeed's update at the accumulation boundary, on every rank, for
                              the plain engine (engine.step) and the pipeline (its OptimizerStep).
                              Wrapped (compat.wrap_model_step): first one all-reduce over the world group of [sum of the
                              losses, number of loss holders, any non-finite loss, non-finite
                              Forge-measured norm], so every rank (tp, pp, dp) decides alike. The
                              loss comes from `note_loss` (pp = 1) or, in a pipeline, from the
                              last stage's summed loss (compat.pipeline_loss).
    the torch optimizer's step  (under DeepSpeed's wrapper, or the engine's optimizer itself)
                              Wrapped: a no-op when the decision says skip. The wrapper then copies
                              the unchanged fp32 masters back and clears the gradients as usual.
    a non-finite gradient norm  Forge measures it at ZeRO 0 without a pipeline (`note_grad_norm`,
                              before engine.step) and, in a pipeline at ZeRO 0 in fp32, inside the
                              wrapped torch step (forge.parallel.grad_norm, reduced over tp and
                              pp); DeepSpeed's ZeRO 1/2/3 and bf16 optimizers already skip an
                              invalid norm themselves (compat.optimizer_overflowed, read after
                              the step).

fp16: a non-finite gradient norm there is the dynamic loss scaler's overflow, its normal way to
find the scale; it skips the step and lowers the scale. Such steps count in `skipped_steps` but
not toward `max_skipped_steps`; a non-finite loss does. `train.spike_factor` > 0 also skips a step
whose global mean loss exceeds factor x the mean loss of the last SPIKE_WINDOW applied steps
(checked once that many were applied).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch

from forge import deepspeed_compat as compat

SPIKE_WINDOW = 20


class NonFiniteError(RuntimeError):
    """Training produced non-finite values that Forge does not continue from or save."""


def _all_reduce_sum(values: list[float]) -> list[float]:
    from forge.train import distributed as dist
    if dist.world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device())
    torch.distributed.all_reduce(t)
    return t.tolist()


class StepGuard:
    """Decides, on every rank alike, whether the optimizer step at this boundary is applied (see
    the module doc). After each step `reason` is None (applied) or why it was skipped: "loss",
    "grad_norm", "spike" (count toward train.max_skipped_steps) or "overflow" (fp16 loss scale)."""

    def __init__(self, engine, cfg, groups, measured_norm: bool):
        self.engine, self.groups = engine, groups
        self.fp16 = cfg.train.precision == "fp16"
        self.spike_factor = cfg.train.spike_factor
        self.window: deque = deque(maxlen=SPIKE_WINDOW)   # mean losses of the last applied steps
        self.measured_norm = measured_norm                # Forge measures the norm before engine.step
        opt = engine.optimizer
        self.inner = getattr(opt, "optimizer", opt)
        self.wrapped = self.inner is not opt              # DeepSpeed's ZeRO / bf16 / fp16 wrapper
        self.pipeline = hasattr(engine, "train_batch")
        # a pipeline's fp32 ZeRO 0 steps torch AdamW directly: nobody checks the norm but us
        self.check_norm_inside = not self.wrapped and not measured_norm and not self.fp16
        self._loss: Optional[float] = None
        self._norm: Optional[float] = None
        self.decision: Optional[str] = None
        self.reason: Optional[str] = None
        self.mean_loss: Optional[float] = None
        self._inner_ran = False
        self._orig_step = self.inner.step
        compat.wrap_model_step(engine, before=self._decide, after=self._finish)
        self.inner.step = self._inner_step

    # ---- what train_step tells the guard before engine.step at the boundary (pp = 1)
    def note_loss(self, mean_loss: float) -> None:
        """This rank's mean loss over its micro batches of the step."""
        self._loss = float(mean_loss)

    def note_grad_norm(self, norm: Optional[float]) -> None:
        """The global gradient norm Forge measured (identical on every rank)."""
        self._norm = None if norm is None else float(norm)

    # ---- the wrapped DeepSpeed methods
    def _local_loss(self) -> Optional[float]:
        if self.pipeline:
            total = compat.pipeline_loss(self.engine)          # on the last stage only
            return None if total is None else total / max(1, self.engine.gradient_accumulation_steps())
        return self._loss

    def _decide(self) -> None:
        loss = self._local_loss()
        norm_bad = self._norm is not None and not math.isfinite(self._norm) and not self.fp16
        have = loss is not None
        bad = have and not math.isfinite(loss)
        total, holders, n_bad, n_norm = _all_reduce_sum(
            [loss if have and not bad else 0.0, float(have), float(bad), float(norm_bad)])
        self.mean_loss = total / holders if holders and not n_bad else float("nan")
        self.decision = "loss" if n_bad else "grad_norm" if n_norm else None
        if self.decision is None and self.spike_factor and len(self.window) == self.window.maxlen:
            if self.mean_loss > self.spike_factor * sum(self.window) / len(self.window):
                self.decision = "spike"
        self._inner_ran = False

    def _inner_step(self, *args, **kwargs):
        self._inner_ran = True
        if self.decision is None and self.check_norm_inside:
            from forge.parallel.grad_norm import global_grad_norm
            params = [p for g in self.inner.param_groups for p in g["params"]]
            if not math.isfinite(float(global_grad_norm(params, self.groups))):
                self.decision = "grad_norm"
        if self.decision is not None:
            return None                                    # no update, no Adam step: see the module doc
        return self._orig_step(*args, **kwargs)

    def _finish(self) -> None:
        reason = self.decision
        if reason is None and self.wrapped and compat.optimizer_overflowed(self.engine):
            reason = "overflow" if self.fp16 else "grad_norm"     # DeepSpeed skipped an invalid norm
        if reason is None and not self._inner_ran:
            reason = "overflow"                            # fp16 at ZeRO 0: the GradScaler found inf
        self.reason = reason
        if reason is None and math.isfinite(self.mean_loss):
            self.window.append(self.mean_loss)
        self._loss = self._norm = None

    # ---- the running mean of spike detection, kept in checkpoints for an exact resume
    def state_dict(self) -> dict:
        return {"loss_window": list(self.window)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.window.clear()
        self.window.extend((state or {}).get("loss_window", []))


def counts(reason: Optional[str]) -> bool:
    """Whether a skip counts toward train.max_skipped_steps (not the fp16 loss scaler's own)."""
    return reason is not None and reason != "overflow"


def _tensors(engine):
    """(name, tensor) of what a checkpoint holds of this rank: module weights (a ZeRO 3 rank's
    partition), the torch optimizer's fp32 parameters (DeepSpeed's masters) and its state."""
    for name, p in engine.module.named_parameters():
        yield name, getattr(p, "ds_tensor", p)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for gi, group in enumerate(inner.param_groups):
        for pi, p in enumerate(group["params"]):
            yield f"optimizer group {gi} parameter {pi}", p
    for i, state in enumerate(inner.state.values()):
        for key, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point():
                yield f"optimizer state {i} {key}", v
    yield from compat.fp32_partitions(opt)


@torch.no_grad()
def check_finite_weights(engine, step: int) -> None:
    """Raise NonFiniteError on every rank when any rank holds a non-finite weight, master or
    optimizer state (collective; called before a checkpoint is written)."""
    from forge.train import distributed as dist
    by_device: dict = {}                    # one host sync per device, not one per tensor
    for name, t in _tensors(engine):
        if t.numel():
            by_device.setdefault(t.device, []).append((name, torch.isfinite(t).all()))
    bad = None
    for found in by_device.values():
        ok = torch.stack([flag for _, flag in found]).tolist()
        bad = bad or next((name for (name, _), good in zip(found, ok) if not good), None)
    if not dist.all_reduce_max(int(bad is not None)):
        return
    names = dist.gather_object(bad)         # rank 0: every rank's first bad tensor (or None)
    every = dist.broadcast_object([f"rank {r}: {n}" for r, n in enumerate(names) if n] if names else None)
    raise NonFiniteError(f"checkpoint step {step} not written: non-finite values in {', '.join(every)}; the last "
                         "complete checkpoint is untouched (lower optim.lr or resume from it)")
