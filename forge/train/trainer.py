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
    # OUT/superseded/ once every check has passed (see _run), never overwritten; incomplete ones
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
    from forge.data import batch_iterator
    main = dist.is_main()
    dp_rank, dp_size = groups.dp_rank, groups.dp
    B, GA, T = cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.data.seq_len
    samples_per_step = B * GA * dp_size

    start_step, consumed, tokens, skipped = 0, 0, 0, 0
    rng = None
    step_guard = StepGuard(engine, cfg, groups, measured_norm=manual_clipping(cfg))
    if resume_path:
        state = ckpt.load_checkpoint(engine, resume_path, groups, cfg, relayout=relayout)
        start_step, consumed = int(state["step"]), int(state["consumed_samples"])
        tokens, rng = int(state.get("tokens", consumed * T)), state.get("rng")
        skipped = int(state.get("skipped_steps", 0))
        step_guard.load_state_dict(state)
        sched = getattr(engine, "lr_scheduler", None)
        if sched is not None and getattr(sched, "last_step", start_step) != start_step:
            sched.load_state_dict({"last_step": start_step})

    end_step = cfg.train.max_steps if stop_at is None else min(stop_at, cfg.train.max_steps)
    result = TrainResult(config=cfg, out_dir=out_dir, start_step=start_step, step=start_step)
    if start_step >= end_step:
        if main:
            print(f"forge train: checkpoint {resume_path} is at step {start_step}, train.max_steps="
                  f"{cfg.train.max_steps}: nothing to do", flush=True)
        result.checkpoint = resume_path
        return result

    # ---- shared files (rank 0), now that every check passed
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    moved = []
    if main:
        moved = ckpt.set_aside(list(newer), out_dir)
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        if hasattr(bundle.tokenizer, "save"):
            bundle.tokenizer.save(tokenizer_dir)
    dist.barrier()
    logger = MetricsLogger(cfg, out_dir, start_step, enabled=main)
    from forge.models.transformer import build_model
    n_params = build_model(cfg.model, device="meta").num_params()     # the whole model, not this rank's part
    if resume_path:
        logger.write(f"resuming from {resume_path} (step {start_step}, {consumed} samples consumed)")
        for old, new in moved:
            logger.write(f"  {old} is newer than the checkpoint resumed from: moved aside to {new} (kept, not "
                         "resumed from; delete it when no longer needed)")
        if relayout:
            logger.write("  under another layout than it was written with: weights and optimizer state read per "
                         "rank from its sharded model/ and optim/ files")
        for w in warnings:
            logger.write(f"  config changed since the checkpoint: {w}")
    logger.write(f"model: vocab {cfg.model.vocab_size}; {samples_per_step} sequences x {T} tokens "
                 f"({human(samples_per_step * T)}) per step; {cfg.train.precision}; out_dir {out_dir}")
    per_rank = dist.gather_object(rank_param_count(engine.module))        # every rank takes part
    if main:
        for line in layout_lines(n_params, per_rank, groups, cfg):
            logger.write(line)
    for w in schedule_warnings(cfg.optim, cfg.train.max_steps):
        logger.write(f"warning: {w}")
    tokens_at_start = tokens

    if rng is not None:
        ckpt.set_rng_state(rng)
    else:
        seed_everything(cfg.train.seed + groups.dp_rank)     # equal across tp/pp ranks: replicated dropout
        tp_stream.seed(cfg.train.seed + 2718 + groups.tp_rank if groups.tp > 1 else None)
    it = batch_iterator(bundle.train, micro_batch_size=B, dp_rank=dp_rank, dp_size=dp_size,
                        consumed_samples=consumed, with_dataset=cfg.model.steering_datasets > 0)
    clip_params = [p for p in engine.module.parameters() if p.requires_grad] if manual_clipping(cfg) else None
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def save(step: int) -> str:
        from forge.layout.optim import _ensure_state, _inner
        if not _inner(engine).state:            # every step so far was skipped: Adam has no state yet
            _ensure_state(engine, 0)
        path = ckpt.save_checkpoint(
            engine, cfg, out_dir, step, groups,
            {"consumed_samples": consumed, "tokens": tokens, "world_size": dist.world_size(), "dp_size": dp_size,
             "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision,
             "optimizer_layout": optimizer_layout(cfg), "skipped_steps": skipped, **step_guard.state_dict(),
             "forge_version": _forge_version()},
            tokenizer_dir=tokenizer_dir if os.path.isdir(tokenizer_dir) else None)
        logger.write(f"saved checkpoint {path}")
        if main:                                # only now that `path` is complete
            gone = ckpt.prune_checkpoints(out_dir, step, cfg.train.keep_last, cfg.train.keep_every)
            if gone:
                logger.write(f"removed {', '.join(os.path.basename(g) for g in gone)} (train.keep_last="
                             f"{cfg.train.keep_last}, train.keep_every={cfg.train.keep_every})")
        return path

    from forge.models.layers.moe import moe_metrics
    # every rank, also a pipeline stage without MoE layers: the metrics are gathered over pp
    has_moe = bool(cfg.model.moe.n_experts)
    quant = cfg.model.quant.enabled

    engine.train()
    window_t, window_tokens, window_losses, train_time = 0.0, 0, [], 0.0
    step, saved_at, in_a_row = start_step, None, 0
    max_skipped = cfg.train.max_skipped_steps
    sched = getattr(engine, "lr_scheduler", None)
    watchdog = StepWatchdog(cfg.train.step_timeout_s, cfg.train.first_step_timeout_s, rank=dist.rank(),
                            log_path=os.path.join(out_dir, f"watchdog_rank{dist.rank()}.log"))
    try:
        with SignalGuard(cfg.train.stop_timeout_s, dist.rank()) as guard, watchdog:
            while step < end_step:
                t0 = time.perf_counter()
                step += 1
                if quant:                   # the ramp of model.quant.warmup_steps reads the step explicitly
                    set_quant_step(engine.module, step)
                step_loss, grad_norm = train_step(engine, it, GA, groups, clip_params, max_norm, has_moe, step_guard)
                skip = step_guard.reason
                if sched is not None and sched.last_step != step:      # DeepSpeed does not step it after
                    sched.load_state_dict({"last_step": step})         # a skipped update; the step counts
                consumed += samples_per_step
                tokens += samples_per_step * T
                if dp_size > 1:
                    step_loss = dist.all_reduce_mean([step_loss])[0]
                dt = time.perf_counter() - t0
                window_t += dt
                train_time += dt
                window_tokens += samples_per_step * T
                if math.isfinite(step_loss):
                    window_losses.append(step_loss)
                if skip:
                    skipped += 1
                    in_a_row = in_a_row + 1 if counts(skip) else 0
                    logger.write(f"step {step}: update skipped on every rank ({_SKIP_WHY[skip]}: loss {step_loss:.4g}, "
                                 f"grad_norm {grad_norm}); {in_a_row} in a row, train.max_skipped_steps={max_skipped}")
                else:
                    in_a_row = 0
                result.losses.append(step_loss)
                result.grad_norms.append(grad_norm)
                lr = lr_at(step, cfg.optim, cfg.train.max_steps)
                logger.step(step, step_loss, lr, window_tokens / window_t if window_t else None)
                watchdog.beat(f"step {step}")

                if (cfg.train.log_interval and step % cfg.train.log_interval == 0) or step == end_step or skip:
                    mean = sum(window_losses) / len(window_losses) if window_losses else float("nan")
                    logger.log({"step": step, "loss": mean, "lr": lr,
                                "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(window_t, 1e-9),
                                "tokens": tokens, "elapsed_s": round(time.perf_counter() - t_start, 3),
                                "skipped_steps": skipped,
                                **({"skipped": skip, "skipped_in_a_row": in_a_row} if skip else {}),
                                **(moe_metrics(engine.module, group=groups.pp_group) if has_moe else {})})
                    window_t, window_tokens, window_losses = 0.0, 0, []
                if max_skipped and in_a_row >= max_skipped:
                    last = ckpt.latest_checkpoint(out_dir)
                    raise NonFiniteError(
                        f"step {step}: {in_a_row} steps in a row skipped ({_SKIP_WHY[skip]}), train.max_skipped_steps="
                        f"{max_skipped}: training stopped without a checkpoint of them (the weights are those of "
                        f"step {step - in_a_row}); lower optim.lr or check the data, then resume from "
                        f"{last or 'a fresh start'}")
                inject_fault(step, dist.rank())
                if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps):
                    val = evaluate(engine, bundle.valid, cfg, dp_rank, dp_size)
                    if val is not None:
                        result.val_losses.append((step, val))
                        if not math.isfinite(val):
                            logger.write(f"step {step}: warning: the validation loss is not finite ({val}); "
                                         "logged as null, training goes on")
                        logger.log({"step": step, "val_loss": val,
                                    "val_ppl": math.exp(min(val, 50.0)) if math.isfinite(val) else float("nan")})
                    watchdog.beat(f"the evaluation after step {step}")
                stop = dist.all_reduce_max(guard.signum or 0)
                if stop:
                    result.interrupted = stop
                    guard.acknowledge()     # every rank got here: the save below may take its time
                if (cfg.train.save_interval and step % cfg.train.save_interval == 0) or step == end_step or stop:
                    result.checkpoint = save(step)
                    saved_at = step
                    watchdog.beat(f"the checkpoint of step {step}")
                if stop:
                    logger.write(f"received {signal.Signals(stop).name}: stopped after step {step} "
                                 f"with a checkpoint; resume with train.resume=auto")
                    break
    finally:
        result.step = step
        result.metrics = list(logger.records)
        result.wall_time_s = time.perf_counter() - t_start
        result.tokens_per_s = (step - start_step) * samples_per_step * T / train_time if train_time else 0.0
        logger.close()
    assert saved_at == step
    if main:
        from forge.plot import read_run
        result.summary = build_summary(result, read_run(out_dir)[1], n_params, tokens, tokens - tokens_at_start)
        write_summary(out_dir, result.summary)
        print(format_summary(result.summary), flush=True)
    return result


_SKIP_WHY = {"loss": "non-finite loss", "grad_norm": "non-finite gradient norm",
             "spike": "loss above train.spike_factor x the running mean", "overflow": "fp16 loss-scale overflow"}


def _forge_version() -> str:
    import forge
    return getattr(forge, "__version__", "unknown")
