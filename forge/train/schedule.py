"""Learning-rate schedules as plain functions of the update number, plus the scheduler object
DeepSpeed steps after every optimizer update.

Update t = 1, 2, ..., max_steps uses `lr_at(t)` (peak = optim.lr, floor = optim.min_lr, W = warmup_steps):

    warmup (all schedules)   t <= W:  lr * t / W
    cosine                   t >  W:  min + (lr - min) * (1 + cos(pi * p)) / 2,  p = (t - W) / (max_steps - W)
    wsd (warmup-stable-decay)         lr until t <= S = max_steps - round(decay_frac * max_steps), then
                                      linear to min: lr + (min - lr) * (t - S) / (max_steps - S)
    constant                          lr

so the last update (t = max_steps) of cosine and wsd runs at exactly min_lr; past max_steps the lr
stays at min_lr. The schedule is a function of t only, so resuming needs just the step count.
"""
from __future__ import annotations

import math

from forge.config import ConfigError, OptimConfig


def lr_at(t: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate of update number `t` (1-based)."""
    peak, floor, warmup = optim.lr, optim.min_lr, optim.warmup_steps
    if warmup > 0 and t <= warmup:
        return peak * t / warmup
    if optim.schedule == "constant":
        return peak
    if t >= max_steps:
        return floor
    if optim.schedule == "cosine":
        p = (t - warmup) / max(1, max_steps - warmup)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
    if optim.schedule == "wsd":
        decay_start = max(warmup, max_steps - round(optim.decay_frac * max_steps))
        if t <= decay_start:
            return peak
        return peak + (floor - peak) * (t - decay_start) / max(1, max_steps - decay_start)
    raise ConfigError(f"optim.schedule={optim.schedule!r} is not one of ['constant', 'cosine', 'wsd']")


def schedule_warnings(optim: OptimConfig, max_steps: int) -> list[str]:
    """What of the configured schedule does not fit in `max_steps` updates (empty when it all fits):

    W > max_steps            the peak optim.lr is never reached (max lr = lr * max_steps / W)
    W = max_steps            the peak is reached only at the last update; no decay (cosine, wsd)
    wsd, W > max_steps - D   the decay runs max_steps - W updates instead of D = round(decay_frac * max_steps)
    """
    W, N, out = optim.warmup_steps, max_steps, []
    if W > N:
        out.append(f"optim.warmup_steps={W} > train.max_steps={N}: the lr never reaches optim.lr={optim.lr:g} (it peaks "
                   f"at {optim.lr * N / W:.3g} on the last step)" + ("" if optim.schedule == "constant" else
                                                                 f" and the {optim.schedule} decay never runs") +
                   f"; lower optim.warmup_steps (e.g. {max(1, N // 10)}) or raise train.max_steps")
    elif W == N and W > 0 and optim.schedule != "constant":
        out.append(f"optim.warmup_steps={W} = train.max_steps: the lr reaches optim.lr={optim.lr:g} only on the last "
                   f"step and the {optim.schedule} decay never runs; lower optim.warmup_steps (e.g. {max(1, N // 10)})")
    elif optim.schedule == "wsd":
        decay = round(optim.decay_frac * N)
        if W > N - decay:
            out.append(f"optim.schedule=wsd decays over {N - W} steps, not the {decay} of optim.decay_frac="
                       f"{optim.decay_frac:g} x train.max_steps={N}: optim.warmup_steps={W} leaves only {N - W} steps "
                       "after the warmup")
    return out


class ForgeLRScheduler:
    """Sets the optimizer's lr to `lr_at(t)` for the next update t. DeepSpeed calls `step()` after
    each applied update and saves/loads `state_dict()` with its checkpoint."""

    def __init__(self, optimizer, optim: OptimConfig, max_steps: int, last_step: int = 0):
        self.optimizer, self.optim, self.max_steps = optimizer, optim, max_steps
        self.last_step = last_step          # updates applied so far
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.last_step + 1, self.optim, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def step(self, *args, **kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
