"""Training checkpoints: layout, atomic completion, discovery and resume.

    OUT/checkpoints/step_{step:08d}/
        model/                      Forge model folder, sharded (forge.models.sharded): config.yaml,
                                    forge_index.json, shard-{rank}.safetensors written by each rank
                                    (its own tensors, nothing gathered); read by `forge generate`,
                                    `forge convert`, `forge.from_pretrained` (older checkpoints
                                    hold one model.safetensors, still read)
        optim/                      the optimizer state, sharded like model/ (forge.layout.optim):
                                    Adam's moments (and fp32 masters of bf16/fp16 weights) as parts
                                    of global tensors, so any layout reads its own part back
        (ds/                        DeepSpeed's own files, in checkpoints written before optim/)
        rng_state_rank{r:05d}.pt    python / numpy / torch (/ cuda) RNG states of rank r
        trainer_state.json          step, consumed_samples, tokens, config and its hash, ...
        COMPLETE                    empty marker, written last (after everything above is on disk)
    OUT/checkpoints/latest          text file naming the newest complete step dir (convenience only)

A directory without COMPLETE (a crash mid-save) is never resumed from; it is deleted when the
same step is saved again. Retention (`train.keep_last`, `train.keep_every`, prune_checkpoints)
deletes older complete checkpoints only after a newer one is complete. `train.resume`: `none` (start fresh; an out_dir that already holds
checkpoints is an error, so nothing is overwritten), `auto` (the newest complete checkpoint in
train.out_dir, or a fresh start when there is none) or a path (a step dir, or a run / checkpoints
dir whose newest complete checkpoint is taken; missing or incomplete -> error).

Resuming from an older step than the newest of train.out_dir (e.g. because the newest is
corrupt) moves the newer step dirs aside, to OUT/superseded/<time>/ (`set_aside`), before the
run writes anything: no complete checkpoint is ever deleted to make room for the resumed run.

A file of a checkpoint that cannot be read (truncated, corrupt, missing) is a CheckpointError
naming the file and the `train.resume=...` of the newest complete checkpoint before it. A write
that fails (ENOSPC: "disk full") is a CheckpointWriteError naming the path; the step dir then
has no COMPLETE marker, so it is never resumed from.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import time
from typing import Any, Optional

import numpy as np
import torch

from forge.config import ConfigError, JobConfig, config_yaml, flatten_dict
from forge.fsutil import JSONFileError, atomic_file, fsync_dir, read_json_object, write_json_atomic
from forge.train import distributed as dist

from forge.models.discovery import (CHECKPOINTS, COMPLETE, MODEL_DIR, STATE_FILE, STEP_RE,  # noqa: F401
                                    checkpoints_dir, is_complete, latest_checkpoint, list_checkpoints,
                                    step_dir)  # noqa: F401

OPTIM_DIR = "optim"
DS_TAG = "ds"
LATEST = "latest"


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, unreadable or does not fit the configured run.
    `rank_local`: only the rank that raised it can see it (its own files), so that rank reports it."""
    rank_local = False


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions, ...); the step dir has no COMPLETE."""


def resume_hint(path: str) -> str:
    """What to do about an unreadable checkpoint `path`: the train.resume= of the newest complete
    checkpoint older than it in the same checkpoints dir, or a fresh start when there is none."""
    norm = os.path.normpath(path)
    m = STEP_RE.match(os.path.basename(norm))
    root = os.path.dirname(norm)
    if m and os.path.basename(root) == CHECKPOINTS:
        older = [p for s, p in list_checkpoints(os.path.dirname(root)) if s < int(m.group(1))]
        if older:
            return (f"resume from the previous complete checkpoint with train.resume={older[-1]} (the newer step "
                    "dirs are then moved aside to superseded/, not deleted)")
    return "there is no earlier complete checkpoint: start a fresh run in another train.out_dir"


def unreadable(path: str, file: str, e: BaseException) -> CheckpointError:
    """CheckpointError: `file` of checkpoint `path` cannot be read, and what to do."""
    return CheckpointError(f"checkpoint {path!r}: {file!r} cannot be read ({type(e).__name__}: {e}); it is "
                           f"truncated or corrupt: {resume_hint(path)}")


# ---------------------------------------------------------------- layout and discovery
def _looks_like_step_dir(path: str) -> bool:
    return bool(STEP_RE.match(os.path.basename(os.path.normpath(path)))) or any(
        os.path.exists(os.path.join(path, n)) for n in (STATE_FILE, COMPLETE, DS_TAG))


def resolve_resume(resume: Optional[str], out_dir: str) -> Optional[str]:
    """The checkpoint dir that `train.resume` names, or None for a fresh start."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = resume
    if not os.path.isdir(path):
        raise CheckpointError(f"train.resume={path!r}: no such checkpoint directory")
    if _looks_like_step_dir(path):
        if not is_complete(path):
            raise CheckpointError(f"train.resume={path!r} is an incomplete checkpoint (no {COMPLETE} marker: "
                                  "the save was interrupted); resume from an older one")
        return path
    norm = os.path.normpath(path)
    run_dir = os.path.dirname(norm) if os.path.basename(norm) == CHECKPOINTS else norm
    found = latest_checkpoint(run_dir)          # a run dir or its checkpoints/ dir
    if found:
        return found
    raise CheckpointError(f"train.resume={path!r} holds no complete checkpoint (step_*/ with a {COMPLETE} marker)")


def read_state(path: str) -> dict:
    """The trainer_state.json of checkpoint `path`; a missing or unreadable one is a
    CheckpointError naming the file and the checkpoint to resume from instead."""
    file = os.path.join(path, STATE_FILE)
    try:
        state = read_json_object(file)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} has no {STATE_FILE}; {resume_hint(path)}") from None
    except (OSError, JSONFileError) as e:
        raise unreadable(path, file, e) from None
    if not isinstance(state.get("step"), int):
        raise unreadable(path, file, ValueError("not an object with an integer 'step'"))
    return state


def set_aside(paths: list[str], out_dir: str) -> list[tuple[str, str]]:
    """Move step dirs `paths` (newer than the checkpoint a run resumes from) to
    OUT/superseded/<UTC time>/ so the resumed run can write those steps again without deleting
    them; returns (old, new) paths. Rank 0 only; COMPLETE markers move with their dirs."""
    if not paths:
        return []
    dest = os.path.join(out_dir, "superseded", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    n = 0
    while os.path.exists(dest + (f"-{n}" if n else "")):
        n += 1
    dest += f"-{n}" if n else ""
    os.makedirs(dest)
    moved = []
    for p in paths:
        new = os.path.join(dest, os.path.basename(os.path.normpath(p)))
        os.rename(p, new)
        moved.append((p, new))
    remaining = list_checkpoints(out_dir)
    if remaining:                           # `latest` names a step dir that is still there
        _write_latest(out_dir, remaining[-1][1])
    fsync_dir(checkpoints_dir(out_dir))
    return moved


def _write_latest(out_dir: str, path: str) -> None:
    with atomic_file(os.path.join(checkpoints_dir(out_dir), LATEST)) as f:
        f.write(os.path.basename(path) + "\n")


# ---------------------------------------------------------------- compatibility
def config_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    a, b = flatten_dict(old), flatten_dict(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_compatible(state: dict, cfg: JobConfig, dp_size: int, path: str) -> list[str]:
    """Raise CheckpointError where the checkpoint cannot continue as `cfg`; return warnings for
    the settings that changed but can (e.g. train.max_steps, optim.lr)."""
    old = state.get("config") or {}
    diff = config_diff(old, cfg.to_dict())
    model = {k: v for k, v in diff.items() if k.startswith("model.") and k != "model.preset"}
    if model:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in model.items())
        raise CheckpointError(f"checkpoint {path!r} holds a different model than the config:\n{lines}\n"
                              "use another train.out_dir for a new model (nothing was written)")
    if "train.precision" in diff:
        a, b = diff["train.precision"]
        raise CheckpointError(f"checkpoint {path!r} was written with train.precision={a!r}, the config has {b!r}; "
                              "resume with the checkpoint's precision")
    then = flatten_dict(old).get("optim.name", "adamw")         # checkpoints before optim.name ran AdamW
    if then != cfg.optim.name:
        raise CheckpointError(f"checkpoint {path!r} holds the state of optim.name={then!r}, the config has "
                              f"optim.name={cfg.optim.name!r}: resume with optim.name={then!r}, or start a new "
                              "train.out_dir with train.init_from pointing at the checkpoint (weights only)")
    diff.pop("optim.name", None)
    ignored = {"train.resume", "train.out_dir", "log.progress"}
    warnings = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items() if not k.startswith("model.") and k not in ignored]
    if state.get("sharded_optimizer"):          # any layout reads it (load_checkpoint, relayout)
        return warnings
    for key in ("parallel.zero_stage", "parallel.tp", "parallel.pp", "parallel.ep"):
        if key in diff:
            a, b = diff[key]
            raise CheckpointError(f"checkpoint {path!r} was written with {key}={a!r}, the config has {b!r}; it "
                                  "predates per-rank optimizer files, so its optimizer state does not carry over: "
                                  f"resume it with {key}={a!r} (the next checkpoint then resumes under any layout)")
    from forge.train.precision import optimizer_layout
    precision = cfg.train.precision             # equal to the checkpoint's (checked above)
    # checkpoints from before optimizer_layout was recorded ran DeepSpeed's optimizer in bf16/fp16
    then = state.get("optimizer_layout", "fp32-weights" if precision == "fp32" else f"deepspeed-{precision}")
    if then != optimizer_layout(cfg):
        raise CheckpointError(f"checkpoint {path!r} holds optimizer state of kind {then!r} (written before Forge ran "
                              f"train.precision={cfg.train.precision} at ZeRO 0 as fp32 weights under autocast); this "
                              f"run needs {optimizer_layout(cfg)!r}: start a new train.out_dir (the checkpoint's "
                              "model/ folder holds its weights)")
    if cfg.parallel.zero_stage > 0 and state.get("dp_size", dp_size) != dp_size:
        raise CheckpointError(f"checkpoint {path!r} holds ZeRO-{cfg.parallel.zero_stage} optimizer partitions for "
                              f"{state.get('dp_size')} data-parallel ranks; this run has {dp_size}")
    return warnings


def layout_changed(state: dict, cfg: JobConfig, dp_size: int) -> bool:
    """Whether `cfg` runs the checkpoint under another layout than it was written with (tp, pp, ep,
    ZeRO stage, optimizer kind, or the data-parallel size under ZeRO): then DeepSpeed's own files
    do not fit and the state is read from the sharded files (load_checkpoint(relayout=True))."""
    from forge.train.precision import optimizer_layout
    old = flatten_dict(state.get("config") or {})
    new = flatten_dict(cfg.to_dict())
    if any(old.get(k) != new.get(k) for k in ("parallel.zero_stage", "parallel.tp", "parallel.pp", "parallel.ep")):
        return True
    if state.get("optimizer_layout", optimizer_layout(cfg)) != optimizer_layout(cfg):
        return True
    return cfg.parallel.zero_stage > 0 and state.get("dp_size", dp_size) != dp_size


# ---------------------------------------------------------------- RNG
def rng_state() -> dict:
    from forge.parallel.random import tp_stream
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tp_stream": tp_stream.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from forge.parallel.random import tp_stream
    if "tp_stream" in state:
        tp_stream.load_state_dict(state["tp_stream"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rng_state_rank{rank:05d}.pt")


# ---------------------------------------------------------------- save / load
def _fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for name in files:
            try:
                with open(os.path.join(d, name), "rb") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        fsync_dir(d)


def _write_sharded(folder: str, parts) -> None:
    """Each rank writes its parts to `folder/shard-{rank}.safetensors`; rank 0 writes the index
    from every rank's part list (metadata only: no tensor leaves its rank). Collective."""
    from forge.models.sharded import merge_index, write_index, write_parts
    every = dist.gather_object(write_parts(folder, dist.rank(), parts))
    if dist.rank() == 0:
        write_index(folder, merge_index(every))


def _save_model_shards(engine, cfg: JobConfig, groups, folder: str, tokenizer_dir: Optional[str]) -> None:
    """The weights each rank owns (forge.layout.weights), the config and the tokenizer. Collective."""
    from forge.layout.build import forge_name_of
    from forge.layout.weights import rank_parts
    from forge.models.io import CONFIG_FILE
    _write_sharded(folder, rank_parts(engine.module, cfg.model, groups, forge_name_of(engine.module, cfg.model)))
    if dist.rank() == 0:
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            f.write(config_yaml(cfg))                   # unused keys marked by comments
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(folder, name))


def save_checkpoint(engine, cfg: JobConfig, out_dir: str, step: int, groups, state: dict,
                    tokenizer_dir: Optional[str] = None) -> str:
    """Write checkpoint `step` (collective: every rank calls it); returns its path. COMPLETE is
    written only after every rank's files are on disk. Weights or optimizer state with a
    non-finite value are refused (NonFiniteError) before anything is touched."""
    from forge.layout.build import forge_name_of
    from forge.train.nonfinite import check_finite_weights
    check_finite_weights(engine, step)
    from forge.layout.optim import low_precision, optimizer_step, rank_optimizer_parts
    path = step_dir(out_dir, step)
    rank = dist.rank()
    with _writing_checkpoint(path):
        if rank == 0:
            if os.path.exists(path):             # a partial save of this step, or a rewound run
                marker = os.path.join(path, COMPLETE)
                if os.path.exists(marker):
                    os.remove(marker)
                shutil.rmtree(path)
            os.makedirs(os.path.join(path, MODEL_DIR))
            os.makedirs(os.path.join(path, OPTIM_DIR))
    dist.barrier()
    with _writing_checkpoint(path):
        _save_model_shards(engine, cfg, groups, os.path.join(path, MODEL_DIR), tokenizer_dir)
        _write_sharded(os.path.join(path, OPTIM_DIR), rank_optimizer_parts(
            engine, cfg.model, groups, forge_name_of(engine.module, cfg.model), low_precision(engine)))
        from forge.train.precision import loss_scaler_state
        state = dict(state, optimizer_step=optimizer_step(engine), sharded_optimizer=True,
                     loss_scaler=loss_scaler_state(engine))
        _save_torch(rng_state(), _rng_file(path, rank))
    dist.barrier()
    if rank == 0:
        with _writing_checkpoint(path):
            full = dict(state, step=step, config=cfg.to_dict(), config_hash=cfg.hash(), time=time.time())
            write_json_atomic(os.path.join(path, STATE_FILE), full, indent=2, default=str)
            _fsync_tree(path)
            with open(os.path.join(path, COMPLETE), "w") as f:
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(path)
            _write_latest(out_dir, path)
    dist.barrier()
    return path


@contextlib.contextmanager
def _writing_checkpoint(path: str):
    """A failed write inside is a CheckpointWriteError naming the file ("disk full" for ENOSPC);
    COMPLETE is written last, so the step dir stays incomplete and is never resumed from."""
    from forge.models.io import WriteError, writing
    try:
        with writing(path):
            yield
    except WriteError as e:
        err = CheckpointWriteError(f"saving checkpoint {path!r} failed: {e}; the step dir is not marked "
                                   f"{COMPLETE}, so it is never resumed from (train.resume=auto takes the "
                                   "previous complete checkpoint)")
        err.rank_local = True
        raise err from e


def _save_torch(obj: Any, file: str) -> None:
    """torch.save through an in-memory buffer and a plain write, so that a full disk is an
    OSError(ENOSPC) naming `file` (torch's zip writer reports it as "unexpected pos N vs M")."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with open(file, "wb") as f:
            f.write(buf.getbuffer())
    except OSError as e:
        if e.filename is None:
            e.filename = file
        raise


def prune_checkpoints(out_dir: str, newest_step: int, keep_last: int, keep_every: int = 0) -> list[str]:
    """Retention (train.keep_last, train.keep_every): delete the complete checkpoints older than
    `newest_step` that are neither among the newest `keep_last` complete ones nor at a step that
    is a multiple of `keep_every`; keep_last=0 keeps everything. Returns the deleted dirs.

    Invariant: called by rank 0 only after checkpoint `newest_step` is complete (its COMPLETE on
    disk; nothing is deleted otherwise), so the run can always resume from a complete checkpoint
    at least as new as any deleted one, in particular the one it resumed from. Each deletion
    removes COMPLETE first: a deletion cut short leaves an incomplete dir, never resumed from."""
    if keep_last <= 0 or not is_complete(step_dir(out_dir, newest_step)):
        return []
    found = list_checkpoints(out_dir)
    keep = {s for s, _ in found[-keep_last:]} | {newest_step}
    if keep_every > 0:
        keep |= {s for s, _ in found if s % keep_every == 0}
    deleted = []
    for s, path in found:
        if s < newest_step and s not in keep:
            os.remove(os.path.join(path, COMPLETE))
            fsync_dir(path)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def load_checkpoint(engine, path: str, groups=None, cfg=None, relayout: bool = False) -> dict:
    """Load engine state (weights, optimizer, lr schedule) from checkpoint `path`; returns its
    trainer state (with the RNG state of this rank under "rng", to be applied by the caller).
    Every rank reads its boxes of the weights and of the optimizer state from the sharded
    model/ and optim/ folders (forge.layout), whatever layout wrote them (`relayout`: another
    one, see layout_changed; its RNG streams are not restored). Checkpoints written before those
    folders existed hold DeepSpeed's files (ds/), read under their own layout; under expert
    parallelism each rank's experts then come from the model folder (`_restore_experts`)."""
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path!r} is incomplete (no {COMPLETE} marker)")
    state = read_state(path)
    if state.get("sharded_optimizer"):
        from forge.layout.build import forge_name_of
        from forge.layout.optim import load_rank_optimizer
        from forge.layout.weights import load_rank_weights
        name_of = forge_name_of(engine.module, cfg.model)
        model_dir, optim_dir = os.path.join(path, MODEL_DIR), os.path.join(path, OPTIM_DIR)
        try:
            load_rank_weights(engine.module, cfg.model, groups, model_dir, name_of)
            load_rank_optimizer(engine, cfg.model, groups, optim_dir, model_dir, name_of,
                                int(state.get("optimizer_step", state["step"])))
        except (OSError, KeyError, ValueError) as e:    # WeightFileError (a ValueError) names the file
            err = CheckpointError(f"checkpoint {path!r}: cannot read its model/ and optim/ files: {e}; "
                                  f"{resume_hint(path)}")
            err.rank_local = True
            raise err from None
        from forge.train.precision import load_loss_scaler_state
        load_loss_scaler_state(engine, state.get("loss_scaler"))
        # per-rank RNG streams carry over only to the same layout
        state["rng"] = None if relayout else _load_rng(path)
        return state
    if not os.path.isdir(os.path.join(path, DS_TAG)):
        raise CheckpointError(f"checkpoint {path!r} has no DeepSpeed state ({DS_TAG}/)")
    try:
        load_path, _ = engine.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as e:          # noqa: BLE001 - torch.load of a truncated ds/*.pt: RuntimeError, EOFError, ...
        file = getattr(e, "filename", None) or _unreadable_zip(os.path.join(path, DS_TAG)) or os.path.join(path, DS_TAG)
        err = unreadable(path, file, e)
        err.rank_local = True
        raise err from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state under {os.path.join(path, DS_TAG)!r}")
    if groups is not None and groups.ep > 1:
        _restore_experts(engine.module, cfg.model, path, groups)
    state["rng"] = _load_rng(path)
    return state


def _unreadable_zip(folder: str) -> Optional[str]:
    """The first *.pt file under `folder` whose zip directory (at its end: torch.save's format)
    does not read, i.e. a truncated file; None when all do. Reads no tensor data."""
    import zipfile
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        file = os.path.join(folder, name)
        if name.endswith(".pt"):
            try:
                zipfile.ZipFile(file).close()
            except (OSError, zipfile.BadZipFile):
                return file
    return None


def _load_rng(path: str):
    """This rank's saved RNG states (rank 0's where this rank has none), or None."""
    rng_file = _rng_file(path, dist.rank())
    if not os.path.isfile(rng_file):
        rng_file = _rng_file(path, 0)
    if not os.path.isfile(rng_file):
        return None
    try:
        state = torch.load(rng_file, weights_only=False)
        if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
            raise ValueError("not a dict of python/numpy/torch RNG states")
    except Exception as e:          # noqa: BLE001 - torch.load of a truncated file: RuntimeError, EOFError, ...
        err = unreadable(path, rng_file, e)
        err.rank_local = True
        raise err from None
    return state


def _restore_experts(model, cfg, path: str, groups) -> None:
    """Put this rank's experts back from the checkpoint's model folder (all experts, gathered over
    ep, tp and pp when saved). DeepSpeed writes the module weights from data-parallel rank 0 only
    and recognises experts only in its own MoE layer class, so its load gives every
    expert-parallel rank the experts of ep rank 0. Under ZeRO 1/2 the fp32 master partitions,
    which each rank saves and loads itself, are right already; this puts the module's copies
    (what the next forward uses) in line with them."""
    from forge.layout.weights import load_rank_weights
    from forge.models.layers.moe import expert_params
    from forge.layout.build import forge_name_of
    name_of = forge_name_of(model, cfg)
    load_rank_weights(model, cfg, groups, os.path.join(path, MODEL_DIR), name_of,
                      names={name_of(n) for n in expert_params(model)})
