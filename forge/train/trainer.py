"""The training loop: data -> DeepSpeed engine -> metrics and checkpoints.

    from forge.config import load_config
    from forge.train.trainer import train
    result = train(load_config("configs/shakespeare_char.yaml", ["train.max_steps=100"]))
    result.losses        # training loss of every step this call ran
    result.metrics       # the records written to metrics.jsonl by this call

This module: the checks before a run (same config and data on every rank, the vocabulary, the
checkpoint to resume from), the run lock, the rank's model and engine. The run itself (resume,
run files, seeding, the loop of steps, evaluation, checkpoints, summary) is forge.train.loop.

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
import os
import time
from typing import Optional

import torch

from forge import deepspeed_compat as compat
from forge.config import ConfigError, JobConfig
from forge.data.integrity import check_same_data, verify_data
from forge.kernels import linear_backend
from forge.train import checkpoint as ckpt
from forge.train import distributed as dist
from forge.train.engine import check_supported, compile_determinism, create_engine
from forge.train.loop import TrainResult, _Run, seed_everything   # TrainResult, seed_everything: also public here
from forge.train.runlock import acquire_for_run
from forge.train.metrics import check_logging_available


# ---------------------------------------------------------------- helpers
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
