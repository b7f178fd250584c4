"""The training loop: data -> DeepSpeed engine -> metrics and checkpoints.

    from forge.config import load_config
    from forge.train.trainer import train
    result = train(load_config("configs/shakespeare_char.yaml", ["train.max_steps=100"]))
    result.losses        # training loss of every step this call ran
    result.metrics       # the records written to metrics.jsonl by this call

Step t (1-based) runs `train.grad_accum` micro batches of `train.micro_batch_size` sequences per
data-parallel rank; the loss is next-token cross-entropy of batch[:, :-1] -> batch[:, 1:]. The
data position is the global count of consumed samples, so a resumed run reads exactly the batches
an uninterrupted run would have read; with the model, optimizer, lr schedule and RNG states
restored from the checkpoint its losses equal the uninterrupted run's bit for bit (fp32; with
train.compile on CPU too, see forge.train.engine.compile_determinism; not with compile on GPUs).

Vocabulary: `model.vocab_size` follows the tokenizer unless the user set it (`explicit_vocab`,
which `forge train` derives from the YAML file and the overrides); a set value must be at least
the tokenizer's vocabulary (larger = padding rows).

Data checks (forge.data.integrity), each a config error (exit 2) naming the shard: every rank
reads the same shards and split/blend settings (`check_same_data`), and once the vocabulary is
known every shard's checksums match its manifest and its token ids lie in [0, model.vocab_size)
(`verify_data`; read once per shard, then cached by file size and mtime).

One run per out_dir: rank 0 holds OUT/.lock (forge.train.runlock) from before the first read of
the run dir until `train` returns or raises; a second run there raises RunLockError having
written nothing.

A step whose loss or global gradient norm is not finite is skipped on every rank, weights and
optimizer state untouched (forge.train.nonfinite); `train.max_skipped_steps` of them in a row
raise NonFiniteError, and no checkpoint is written with a non-finite value. `train.keep_last` /
`train.keep_every` delete older checkpoints once a newer one is complete (ckpt.prune_checkpoints).

SIGINT / SIGTERM (forge.train.signals): the current step finishes, a checkpoint is written and
`train` returns with `interrupted` set to the signal number. A rank that has not finished its step
`train.stop_timeout_s` after the signal (e.g. waiting in a collective for a rank that died: how
torchrun ends a job after a worker failed), or that gets a second signal, writes its stacks and
exits at once with status 128 + signal, without a checkpoint.

Hangs: every collective (and the wait of ranks > 0 for rank 0's data index) gives up after
`train.collective_timeout_s`; a step watchdog (forge.train.watchdog) ends a rank on which no step,
evaluation or save finished within `train.step_timeout_s` (`train.first_step_timeout_s` for the
first), after writing every thread's stack to stderr and OUT/watchdog_rank{R}.log, with exit
status 124, so that the launcher ends the job.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from forge import deepspeed_compat as compat
from forge.config import ConfigError, JobConfig, save_config
from forge.data.integrity import check_same_data, verify_data
from forge.kernels import linear_backend
from forge.parallel.quant import set_quant_step
from forge.parallel.random import tp_stream
from forge.train import checkpoint as ckpt
from forge.train import distributed as dist
from forge.train.engine import check_supported, compile_determinism, create_engine, manual_clipping
from forge.train.precision import optimizer_layout
from forge.train.runlock import acquire_for_run
from forge.train.signals import SignalGuard
from forge.train.step import evaluate, train_step
from forge.train.metrics import MetricsLogger, check_logging_available, human
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


# ---------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_vocab(cfg: JobConfig, tokenizer, explicit_vocab: bool) -> None:
    tv = int(tokenizer.vocab_size)
    if explicit_vocab:
        if cfg.model.vocab_size < tv:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                              f"({tv} tokens, data.tokenizer={cfg.data.tokenizer!r}); leave model.vocab_size unset "
                              "to take the tokenizer's size")
    else:
        cfg.model.vocab_size = tv
    cfg.validate()


def _quiet_deepspeed() -> None:
    level = os.environ.get("FORGE_DS_LOG_LEVEL", "WARNING").upper()
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(getattr(logging, level, logging.WARNING))
    except Exception:       # pragma: no cover
        pass


@contextlib.contextmanager
def _data_errors():
    """Bad data settings or damaged data: a config error naming the file, no traceback (exit 2)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from e


def _build_data(cfg: JobConfig, rank: int, world: int):
    from forge.data import build_data
    from forge.data.cache import set_wait_timeout
    set_wait_timeout(cfg.train.collective_timeout_s)      # ranks > 0 wait for rank 0's index that long
    with _data_errors():
        return build_data(cfg.data, seed=cfg.train.seed, work_dir=cfg.train.out_dir, rank=rank, world_size=world)


def config_mismatch(configs: list[dict], limit: int = 12) -> Optional[str]:
    """None when every rank's resolved config dict (`configs[r]`) equals rank 0's; else lines
    naming each differing key with rank 0's value and the other rank's."""
    lines = []
    for r, other in enumerate(configs[1:], start=1):
        for key, (a, b) in ckpt.config_diff(configs[0], other).items():
            lines.append(f"  {key}: rank 0 {a!r}, rank {r} {b!r}")
    if not lines:
        return None
    more = f"\n  ... ({len(lines) - limit} more)" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def check_same_config(cfg: JobConfig) -> None:
    """Every rank must run the same resolved config: compare hashes, and on a mismatch gather
    the configs and name the keys that differ (an error on every rank, not a hang)."""
    if dist.world_size() == 1:
        return
    hashes = [None] * dist.world_size()
    torch.distributed.all_gather_object(hashes, cfg.hash())
    if len(set(hashes)) > 1:
        configs = [None] * dist.world_size()
        torch.distributed.all_gather_object(configs, cfg.to_dict())
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise ConfigError(f"ranks {bad} resolved a different config than rank 0:\n{config_mismatch(configs)}\n"
                          "start every rank with the same config file and overrides")


# ---------------------------------------------------------------- train
def train(cfg: JobConfig, *, data=None, explicit_vocab: bool = False, stop_at: Optional[int] = None,
          explicit: frozenset = frozenset()) -> TrainResult:
    """Train as `cfg` says and return what was run (see module doc).

    data: a prebuilt data bundle (`.tokenizer`, `.train`, `.valid`) instead of `build_data(cfg.data)`.
    explicit_vocab: keep cfg.model.vocab_size (must cover the tokenizer) instead of the tokenizer's.
    stop_at: stop after this step as if interrupted (a checkpoint is written), keeping the
    schedule of train.max_steps; for tests and staged runs.
    explicit: the dotted keys the user wrote (YAML + overrides); with train.init_from, the model
    keys among them are applied over the source's config (refused where they change shapes).
    """
    t_start = time.perf_counter()
    compat.select_accelerator()                             # before anything imports deepspeed
    cfg = cfg.resolved()
    check_supported(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_logging_available(cfg)
    out_dir = os.path.abspath(cfg.train.out_dir)
    cfg.train.out_dir = out_dir
    _quiet_deepspeed()

    # ---- the run dir is this run's alone (forge.train.runlock), before anything is read or written
    dist.init_distributed(cfg.train.collective_timeout_s)
    lock = acquire_for_run(out_dir)
    try:
        with linear_backend(cfg.train.linear_backend):     # restored when the run ends
            return _train_locked(cfg, out_dir, data, explicit_vocab, stop_at, explicit, t_start)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg, out_dir, data, explicit_vocab, stop_at, explicit, t_start) -> TrainResult:
    # ---- which checkpoint, before anything is written
    resume_path = ckpt.resolve_resume(cfg.train.resume, out_dir)
    if resume_path is None:
        existing = ckpt.list_checkpoints(out_dir)
        if existing and cfg.train.resume == "none":
            raise ckpt.CheckpointError(
                f"train.out_dir={out_dir!r} already holds checkpoints (newest: {existing[-1][1]}); "
                "pass train.resume=auto to continue that run, or choose another train.out_dir (nothing was written)")
    state0 = ckpt.read_state(resume_path) if resume_path else None
    # complete step dirs newer than the one resumed from (e.g. a corrupt newest one): set aside to
    # OUT/superseded/ once every check has passed (_Run.open_run_files), never overwritten; incomplete ones
    # are replaced when their step is saved again, as after any crash
    newer = [p for s, p in ckpt.list_checkpoints(out_dir) if s > int(state0["step"])] if state0 is not None else []

    rank, world = dist.rank(), dist.world_size()
    init_folder = None
    if cfg.train.init_from and resume_path is None:       # a resumed run continues its own weights
        from forge.train.init_from import resolve_init_from
        init_folder = resolve_init_from(cfg, set(explicit), rank)
        explicit_vocab = True                               # the source's vocabulary (it must cover the tokenizer's)
    check_same_config(cfg)
    from forge.parallel.groups import build_groups
    groups = build_groups(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    seed_everything(cfg.train.seed)
    bundle = data if data is not None else _build_data(cfg, rank, world)
    with _data_errors(): check_same_data(bundle)                 # every rank reads the same shards and splits
    resolve_vocab(cfg, bundle.tokenizer, explicit_vocab)          # re-validates the config
    with _data_errors(): verify_data(bundle, cfg.model.vocab_size)   # checksums, token ids < vocab (cached)
    if state0 is not None:
        warnings = ckpt.check_compatible(state0, cfg, groups.dp, resume_path)
        relayout = ckpt.layout_changed(state0, cfg, groups.dp)
    else:
        warnings, relayout = [], False

    # ---- model and engine
    seed_everything(cfg.train.seed)
    model = build_rank_model(cfg, groups)
    if init_folder is not None:
        from forge.train.init_from import load_init_weights
        load_init_weights(model, cfg, groups, init_folder)
    engine = create_engine(cfg, model, groups)
    try:
        with compile_determinism(cfg):
            return _run(cfg, engine, bundle, out_dir, resume_path, warnings, stop_at, t_start, groups, relayout, newer)
    finally:
        if hasattr(engine, "destroy"):
            try:
                engine.destroy()
            except Exception:       # pragma: no cover
                pass
        del engine, model
        gc.collect()


def build_rank_model(cfg: JobConfig, groups):
    """This rank's part of the model for the job's layout, on its training device: only its shard
    is ever built, with weights that depend on train.seed and the tensor names alone (the same
    initial weights on every layout); under ZeRO 3 partitioned while it is built."""
    from forge.layout.build import build_for_layout
    from forge.train.engine import build_ds_config
    model = build_for_layout(cfg.model, groups, cfg.parallel.sequence_parallel, cfg.parallel.pp_partition,
                             checkpoint_interval=1 if cfg.train.activation_checkpointing == "full" else 0,
                             seed=cfg.train.seed, device=dist.device(),
                             zero3_config=build_ds_config(cfg, groups.dp) if cfg.parallel.zero_stage == 3 else None)
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    else:                                       # a pipeline: "full" is its checkpoint interval of 1
        from forge.models.block import set_attention_checkpointing
        set_attention_checkpointing(model, cfg.train.activation_checkpointing == "attention")
    return model


def _run(cfg, engine, bundle, out_dir, resume_path, warnings, stop_at, t_start, groups, relayout=False,
         newer=()) -> TrainResult:
    """This rank's run once the engine exists, in named steps (every rank runs every one of them:
    each may hold a collective): resume or start, open the run files, seed and position the data,
    the loop of steps, the summary. Nothing is written to out_dir when there is nothing to do."""
    run = _Run(cfg, engine, bundle, out_dir, groups, t_start)
    rng = run.resume(resume_path, relayout)
    end_step = cfg.train.max_steps if stop_at is None else min(stop_at, cfg.train.max_steps)
    result = run.result = TrainResult(config=cfg, out_dir=out_dir, start_step=run.start_step, step=run.start_step)
    if run.start_step >= end_step:
        if run.main:
            print(f"forge train: checkpoint {resume_path} is at step {run.start_step}, train.max_steps="
                  f"{cfg.train.max_steps}: nothing to do", flush=True)
        result.checkpoint = resume_path
        return result
    run.open_run_files(newer, resume_path, relayout, warnings)
    run.seed_and_position(rng)
    run.loop(end_step)
    assert run.p.saved_at == run.p.step          # the loop ended normally: its last step has a checkpoint
    if run.main:
        run.write_summary()
    return result


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
