"""One `train` call's run on this rank once the engine exists: `_Run`, whose steps
forge.train.trainer._run calls in this order (every rank runs each: each may hold a collective).

  resume     load the checkpoint (if any) into the engine, the step guard and the counters
             (`_Progress`): the lr schedule stands at its step, the data position at its `consumed`
  run files  rank 0, once every check has passed: complete checkpoints newer than the one resumed
             from to OUT/superseded/, config.yaml, the tokenizer; then the metrics logger and header
  seeding    the checkpoint's RNG states, or train.seed + the dp rank (and a tp stream per tp rank);
             the training batches open at the data position
  loop       steps start_step+1 .. end_step under the signal guard and the step watchdog, each:
             train.grad_accum micro batches and the optimizer step (or its skip on every rank,
             forge.train.nonfinite), a metrics.jsonl line every train.log_interval steps,
  eval       the validation loss every train.eval_interval steps and at train.max_steps,
  save       a checkpoint every train.save_interval steps, at the last step and after a stop
             signal, then rank 0 prunes older ones (train.keep_last / train.keep_every)
  summary    rank 0: OUT/summary.json and its text on stdout

Invariants: every rank calls the same steps with the same step numbers, so the collectives in
them (loss mean, stop flag, evaluation, checkpoint) line up. The data position is the global
count of consumed samples, so a resumed run reads the batches an uninterrupted run would have
read; every step, skipped or not, moves it, the lr schedule and the token count on by one step
(a skipped one leaves weights and optimizer state untouched). Nothing is written to out_dir
before the run files. No checkpoint holds a non-finite value (NonFiniteError comes before the
step's checkpoint); one is marked COMPLETE only after every file is written, and older ones are
pruned only then. However the loop ends (also by an exception) the result holds the last step
run, the metrics and the throughput, and the logger is closed; ended normally, its last step has
a checkpoint. `TrainResult` and `seed_everything` live here so that this module need not import
forge.train.trainer, which re-exports both.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from forge.config import JobConfig, save_config
from forge.parallel.quant import set_quant_step
from forge.parallel.random import tp_stream
from forge.train import checkpoint as ckpt
from forge.train import distributed as dist
from forge.train.engine import manual_clipping
from forge.train.precision import optimizer_layout
from forge.train.signals import SignalGuard
from forge.train.step import evaluate, train_step
from forge.train.metrics import MetricsLogger, human
from forge.train.nonfinite import NonFiniteError, StepGuard, counts
from forge.train.summary import build_summary, format_summary, layout_lines, rank_param_count, write_summary
from forge.train.watchdog import StepWatchdog, inject_fault
from forge.train.schedule import lr_at, schedule_warnings


@dataclass
class TrainResult:
    config: JobConfig                       # the resolved config (vocab from the tokenizer)
    out_dir: str
    start_step: int                         # 0, or the step of the checkpoint resumed from
    step: int                               # the last step run
    losses: list[float] = field(default_factory=list)        # one per step start_step+1 .. step
    grad_norms: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)         # lines written to metrics.jsonl
    checkpoint: Optional[str] = None        # the last checkpoint written
    interrupted: Optional[int] = None       # signal number when stopped by SIGINT / SIGTERM
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0               # training throughput over the whole call
    summary: Optional[dict] = None          # what OUT/summary.json holds (rank 0; forge.train.summary)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclass
class _Progress:
    """The run's counters: the first four are what a checkpoint stores and a resume restores (the
    data position is `consumed`, the global count of samples read); the rest are this call's."""
    step: int = 0                   # the last step run (the resumed step before the first)
    consumed: int = 0               # samples consumed over all dp ranks since step 0
    tokens: int = 0                 # tokens trained on since step 0
    skipped: int = 0                # steps whose update was skipped, since step 0
    in_a_row: int = 0               # skipped steps in a row that count toward train.max_skipped_steps
    saved_at: Optional[int] = None  # the step of this call's last checkpoint
    train_time: float = 0.0         # seconds spent in steps (not evaluation or saving)
    window_t: float = 0.0           # since the last metrics line: seconds, tokens, finite losses
    window_tokens: int = 0
    window_losses: list[float] = field(default_factory=list)


class _Run:
    """One `train` call's state on this rank once the engine exists; `_run` calls its steps in
    order. Invariant throughout: every rank calls the same steps with the same step numbers, so
    the collectives inside them (loss mean, stop flag, evaluation, checkpoint) line up."""

    def __init__(self, cfg, engine, bundle, out_dir, groups, t_start):
        self.cfg, self.engine, self.bundle, self.out_dir, self.groups = cfg, engine, bundle, out_dir, groups
        self.t_start = t_start
        self.main = dist.is_main()
        self.T = cfg.data.seq_len
        self.samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * groups.dp
        self.tokenizer_dir = os.path.join(out_dir, "tokenizer")
        self.step_guard = StepGuard(engine, cfg, groups, measured_norm=manual_clipping(cfg))
        self.p = _Progress()
        self.start_step = 0
        self.result: Optional[TrainResult] = None
        self.logger: Optional[MetricsLogger] = None

    # ---- before the first step
    def resume(self, resume_path: Optional[str], relayout: bool):
        """Load the checkpoint at `resume_path` (None: a fresh start, nothing to load) into the
        engine, the step guard and the counters; returns its RNG states (None on a fresh start).
        Keeps: the lr schedule stands at the checkpoint's step and the data position is the
        checkpoint's, so the next step reads the batches an uninterrupted run would have read."""
        if not resume_path:
            return None
        p = self.p
        state = ckpt.load_checkpoint(self.engine, resume_path, self.groups, self.cfg, relayout=relayout)
        p.step, p.consumed = int(state["step"]), int(state["consumed_samples"])
        p.tokens = int(state.get("tokens", p.consumed * self.T))
        p.skipped = int(state.get("skipped_steps", 0))
        self.start_step = p.step
        self.step_guard.load_state_dict(state)
        sched = getattr(self.engine, "lr_scheduler", None)
        if sched is not None and getattr(sched, "last_step", p.step) != p.step:
            sched.load_state_dict({"last_step": p.step})
        return state.get("rng")

    def open_run_files(self, newer, resume_path: Optional[str], relayout: bool, warnings) -> None:
        """Rank 0 writes the run's shared files, only now that every check has passed: complete
        checkpoints `newer` than the one resumed from go to OUT/superseded/ (never overwritten),
        then config.yaml and the tokenizer. Every rank waits for them, then opens the metrics
        logger (which writes on rank 0 only) and logs the header."""
        cfg, out_dir = self.cfg, self.out_dir
        moved = []
        if self.main:
            moved = ckpt.set_aside(list(newer), out_dir)
            os.makedirs(out_dir, exist_ok=True)
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
            if hasattr(self.bundle.tokenizer, "save"):
                self.bundle.tokenizer.save(self.tokenizer_dir)
        dist.barrier()
        self.logger = MetricsLogger(cfg, out_dir, self.start_step, enabled=self.main)
        self._log_header(moved, resume_path, relayout, warnings)

    def _log_header(self, moved, resume_path: Optional[str], relayout: bool, warnings) -> None:
        """The lines before the first step: what was resumed (and set aside), the model and batch
        size, the layout with every rank's parameter count (gathered: every rank takes part), and
        the schedule warnings. Remembers the whole model's parameter count for the summary."""
        from forge.models.transformer import build_model
        cfg, log, p = self.cfg, self.logger.write, self.p
        self.n_params = build_model(cfg.model, device="meta").num_params()  # the whole model, not this rank's part
        if resume_path:
            log(f"resuming from {resume_path} (step {self.start_step}, {p.consumed} samples consumed)")
            for old, new in moved:
                log(f"  {old} is newer than the checkpoint resumed from: moved aside to {new} (kept, not "
                    "resumed from; delete it when no longer needed)")
            if relayout:
                log("  under another layout than it was written with: weights and optimizer state read per "
                    "rank from its sharded model/ and optim/ files")
            for w in warnings:
                log(f"  config changed since the checkpoint: {w}")
        log(f"model: vocab {cfg.model.vocab_size}; {self.samples_per_step} sequences x {self.T} tokens "
            f"({human(self.samples_per_step * self.T)}) per step; {cfg.train.precision}; out_dir {self.out_dir}")
        per_rank = dist.gather_object(rank_param_count(self.engine.module))        # every rank takes part
        if self.main:
            for line in layout_lines(self.n_params, per_rank, self.groups, cfg):
                log(line)
        for w in schedule_warnings(cfg.optim, cfg.train.max_steps):
            log(f"warning: {w}")
        self.tokens_at_start = p.tokens

    def seed_and_position(self, rng) -> None:
        """Restore the checkpoint's RNG states, or seed a fresh run (train.seed + the dp rank:
        equal across tp/pp ranks, so dropout is replicated where the weights are; the tp stream
        per tp rank); open the training batches at the data position `consumed`."""
        from forge.data import batch_iterator
        cfg, g = self.cfg, self.groups
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:
            seed_everything(cfg.train.seed + g.dp_rank)
            tp_stream.seed(cfg.train.seed + 2718 + g.tp_rank if g.tp > 1 else None)
        self.batches = batch_iterator(self.bundle.train, micro_batch_size=cfg.train.micro_batch_size,
                                      dp_rank=g.dp_rank, dp_size=g.dp, consumed_samples=self.p.consumed,
                                      with_dataset=cfg.model.steering_datasets > 0)
        self.clip_params = ([q for q in self.engine.module.parameters() if q.requires_grad]
                            if manual_clipping(cfg) else None)
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    # ---- the loop
    def loop(self, end_step: int) -> None:
        """Steps start_step+1 .. end_step under the signal guard and the step watchdog; ends early
        after the checkpoint of a step at which a stop signal arrived. Keeps, however it ends
        (also by an exception): the result holds the last step run, the metrics written and the
        throughput, and the metrics logger is closed."""
        cfg = self.cfg
        # every rank, also a pipeline stage without MoE layers: the metrics are gathered over pp
        self.has_moe = bool(cfg.model.moe.n_experts)
        self.engine.train()
        self.sched = getattr(self.engine, "lr_scheduler", None)
        self.watchdog = StepWatchdog(cfg.train.step_timeout_s, cfg.train.first_step_timeout_s, rank=dist.rank(),
                                     log_path=os.path.join(self.out_dir, f"watchdog_rank{dist.rank()}.log"))
        try:
            with SignalGuard(cfg.train.stop_timeout_s, dist.rank()) as guard, self.watchdog:
                while self.p.step < end_step:
                    if self._step(end_step, guard):
                        break
        finally:
            self._close()

    def _step(self, end_step: int, guard) -> bool:
        """One step in full: train (or skip), metrics line, skip limit, evaluation, stop check,
        checkpoint. True when a stop signal ends the run (after its checkpoint)."""
        cfg, result = self.cfg, self.result
        step, loss, grad_norm, skip, lr = self._train_one()
        if (cfg.train.log_interval and step % cfg.train.log_interval == 0) or step == end_step or skip:
            self._log_window(step, lr, grad_norm, skip)
        self._check_skip_limit(step, skip)
        inject_fault(step, dist.rank())
        if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps):
            self._evaluate(step)
        stop = dist.all_reduce_max(guard.signum or 0)
        if stop:
            result.interrupted = stop
            guard.acknowledge()     # every rank got here: the save below may take its time
        if (cfg.train.save_interval and step % cfg.train.save_interval == 0) or step == end_step or stop:
            result.checkpoint = self.save(step)
            self.p.saved_at = step
            self.watchdog.beat(f"the checkpoint of step {step}")
        if stop:
            self.logger.write(f"received {signal.Signals(stop).name}: stopped after step {step} "
                              f"with a checkpoint; resume with train.resume=auto")
        return bool(stop)

    def _train_one(self):
        """Step p.step + 1's update: train.grad_accum micro batches, then the optimizer step, or
        its skip on every rank alike when the loss or gradient norm is not finite (or a spike, or
        an fp16 overflow; forge.train.nonfinite) with weights and optimizer state untouched. Either
        way the lr schedule, data position and token count move on by one step. Returns (step,
        loss averaged over dp, grad_norm, skip reason or None, lr)."""
        cfg, p, sps = self.cfg, self.p, self.samples_per_step
        t0 = time.perf_counter()
        p.step += 1
        step = p.step
        if cfg.model.quant.enabled:       # the ramp of model.quant.warmup_steps reads the step explicitly
            set_quant_step(self.engine.module, step)
        loss, grad_norm = train_step(self.engine, self.batches, cfg.train.grad_accum, self.groups,
                                     self.clip_params, self.max_norm, self.has_moe, self.step_guard)
        skip = self.step_guard.reason
        if self.sched is not None and self.sched.last_step != step:   # DeepSpeed does not step it after
            self.sched.load_state_dict({"last_step": step})             # a skipped update; the step counts
        p.consumed += sps
        p.tokens += sps * self.T
        if self.groups.dp > 1:
            loss = dist.all_reduce_mean([loss])[0]
        dt = time.perf_counter() - t0
        p.window_t += dt
        p.train_time += dt
        p.window_tokens += sps * self.T
        if math.isfinite(loss):
            p.window_losses.append(loss)
        if skip:
            p.skipped += 1
            p.in_a_row = p.in_a_row + 1 if counts(skip) else 0
            self.logger.write(f"step {step}: update skipped on every rank ({_SKIP_WHY[skip]}: loss {loss:.4g}, "
                              f"grad_norm {grad_norm}); {p.in_a_row} in a row, "
                              f"train.max_skipped_steps={cfg.train.max_skipped_steps}")
        else:
            p.in_a_row = 0
        self.result.losses.append(loss)
        self.result.grad_norms.append(grad_norm)
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        self.logger.step(step, loss, lr, p.window_tokens / p.window_t if p.window_t else None)
        self.watchdog.beat(f"step {step}")
        return step, loss, grad_norm, skip, lr

    def _log_window(self, step: int, lr: float, grad_norm, skip: Optional[str]) -> None:
        """A metrics.jsonl line for the steps since the last one (mean of their finite losses,
        their throughput), with the skip counts and MoE routing metrics; starts a new window."""
        from forge.models.layers.moe import moe_metrics
        p = self.p
        mean = sum(p.window_losses) / len(p.window_losses) if p.window_losses else float("nan")
        self.logger.log({"step": step, "loss": mean, "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": p.window_tokens / max(p.window_t, 1e-9),
                         "tokens": p.tokens, "elapsed_s": round(time.perf_counter() - self.t_start, 3),
                         "skipped_steps": p.skipped,
                         **({"skipped": skip, "skipped_in_a_row": p.in_a_row} if skip else {}),
                         **(moe_metrics(self.engine.module, group=self.groups.pp_group) if self.has_moe else {})})
        p.window_t, p.window_tokens, p.window_losses = 0.0, 0, []

    def _check_skip_limit(self, step: int, skip: Optional[str]) -> None:
        """NonFiniteError once train.max_skipped_steps counted skips came in a row (0: no limit);
        raised before this step's checkpoint, so no checkpoint holds a non-finite value."""
        p, max_skipped = self.p, self.cfg.train.max_skipped_steps
        if max_skipped and p.in_a_row >= max_skipped:
            last = ckpt.latest_checkpoint(self.out_dir)
            raise NonFiniteError(
                f"step {step}: {p.in_a_row} steps in a row skipped ({_SKIP_WHY[skip]}), train.max_skipped_steps="
                f"{max_skipped}: training stopped without a checkpoint of them (the weights are those of "
                f"step {step - p.in_a_row}); lower optim.lr or check the data, then resume from "
                f"{last or 'a fresh start'}")

    def _evaluate(self, step: int) -> None:
        """The validation loss after `step` (every rank takes part), logged with its perplexity;
        a non-finite one is a warning (logged as null), not an error."""
        val = evaluate(self.engine, self.bundle.valid, self.cfg, self.groups.dp_rank, self.groups.dp)
        if val is not None:
            self.result.val_losses.append((step, val))
            if not math.isfinite(val):
                self.logger.write(f"step {step}: warning: the validation loss is not finite ({val}); "
                                  "logged as null, training goes on")
            self.logger.log({"step": step, "val_loss": val,
                             "val_ppl": math.exp(min(val, 50.0)) if math.isfinite(val) else float("nan")})
        self.watchdog.beat(f"the evaluation after step {step}")

    def save(self, step: int) -> str:
        """The checkpoint of `step` (every rank writes its part) with the counters a resume needs.
        ckpt.save_checkpoint marks it COMPLETE only after every file is written; only then does
        rank 0 prune older ones (train.keep_last / keep_every), so a complete one always exists."""
        from forge.layout.optim import _ensure_state, _inner
        engine, cfg, p = self.engine, self.cfg, self.p
        if not _inner(engine).state:            # every step so far was skipped: Adam has no state yet
            _ensure_state(engine, 0)
        path = ckpt.save_checkpoint(
            engine, cfg, self.out_dir, step, self.groups,
            {"consumed_samples": p.consumed, "tokens": p.tokens, "world_size": dist.world_size(),
             "dp_size": self.groups.dp, "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision,
             "optimizer_layout": optimizer_layout(cfg), "skipped_steps": p.skipped, **self.step_guard.state_dict(),
             "forge_version": _forge_version()},
            tokenizer_dir=self.tokenizer_dir if os.path.isdir(self.tokenizer_dir) else None)
        self.logger.write(f"saved checkpoint {path}")
        if self.main:                                # only now that `path` is complete
            gone = ckpt.prune_checkpoints(self.out_dir, step, cfg.train.keep_last, cfg.train.keep_every)
            if gone:
                self.logger.write(f"removed {', '.join(os.path.basename(g) for g in gone)} (train.keep_last="
                                  f"{cfg.train.keep_last}, train.keep_every={cfg.train.keep_every})")
        return path

    # ---- after the loop
    def _close(self) -> None:
        """Fill the result from the counters (also when the loop raised) and close the logger."""
        p, result = self.p, self.result
        result.step = p.step
        result.metrics = list(self.logger.records)
        result.wall_time_s = time.perf_counter() - self.t_start
        result.tokens_per_s = ((p.step - self.start_step) * self.samples_per_step * self.T / p.train_time
                               if p.train_time else 0.0)
        self.logger.close()

    def write_summary(self) -> None:
        """Rank 0: OUT/summary.json from the result and metrics.jsonl, and its text on stdout."""
        from forge.plot import read_run
        r = self.result
        r.summary = build_summary(r, read_run(self.out_dir)[1], self.n_params, self.p.tokens,
                                  self.p.tokens - self.tokens_at_start)
        write_summary(self.out_dir, r.summary)
        print(format_summary(r.summary), flush=True)


_SKIP_WHY = {"loss": "non-finite loss", "grad_norm": "non-finite gradient norm",
             "spike": "loss above train.spike_factor x the running mean", "overflow": "fp16 loss-scale overflow"}


def _forge_version() -> str:
    import forge
    return getattr(forge, "__version__", "unknown")
