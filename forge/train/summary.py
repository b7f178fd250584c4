"""What a training run reports about itself: its layout at the start, a summary at the end.

At the start (rank 0): the whole model's parameter count, the parameters each rank holds (its
tensor-parallel shards, its pipeline stage, its experts; a ZeRO-3 partition counts as the tensor it
partitions) and the split world = tp x pp x dp, with ep data ranks per expert group.

At the end (rank 0): `OUT/summary.json` and the same summary printed:

    steps          the last step run / train.max_steps (start_step when resumed)
    tokens         seen by the run in all (tokens_run: by this call)
    wall_time_s    of this call; tokens_per_s = this call's tokens / its time in training steps
    val            best and last val_loss of the whole run (metrics.jsonl, resumed calls included),
                   each with val_ppl = exp(val_loss) and its step
    checkpoint     the last checkpoint written
    next           commands to sample from it, convert it to Hugging Face and plot the run
"""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
from typing import Optional

import torch

from forge.fsutil import atomic_file
from forge.train.metrics import human, human_duration

SUMMARY_FILE = "summary.json"


# ---------------------------------------------------------------- start: parameters and layout
def rank_param_count(module: torch.nn.Module) -> int:
    """Parameters this rank holds, each shared tensor once (ZeRO-3: the tensor's full `ds_numel`)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(getattr(p, "ds_numel", p.numel()))
    return total


def layout_lines(n_params: int, per_rank: list[int], groups, cfg) -> list[str]:
    """`parameters: 0.82M in all; per rank 0.41M (2 ranks)` and `layout: world 2 = tp 2 x pp 1 x dp 1 ...`."""
    lo, hi = min(per_rank), max(per_rank)
    each = human(lo) if lo == hi else f"{human(lo)}-{human(hi)} ({', '.join(human(c) for c in per_rank[:8])}" \
                                      f"{', ...' if len(per_rank) > 8 else ''})"
    lines = [f"parameters: {human(n_params)} in all ({n_params:,}); per rank {each} on {len(per_rank)} rank(s)"]
    world = groups.tp * groups.pp * groups.dp
    split = f"layout: world {world} = tp {groups.tp} x pp {groups.pp} x dp {groups.dp}"
    split += f" (ep {groups.ep}" + (f": {cfg.model.moe.n_experts // groups.ep} of {cfg.model.moe.n_experts} experts "
                                     "per rank)" if groups.ep > 1 else ")")
    split += f"; ZeRO-{cfg.parallel.zero_stage}"
    if groups.tp > 1 and cfg.parallel.sequence_parallel:
        split += ", sequence parallel"
    lines.append(split)
    return lines


# ---------------------------------------------------------------- end: summary
def _ppl(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 50.0))


def _show(path: str) -> str:
    """`path` relative to the working directory when under it (shorter commands), else absolute."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def next_commands(out_dir: str, finished: bool) -> list[str]:
    """What to run with the run's newest checkpoint (generate, convert, plot), or how to resume it."""
    out = shlex.quote(_show(out_dir))
    cmds = []
    if not finished:
        cmds.append(f"forge train {shlex.quote(_show(os.path.join(out_dir, 'config.yaml')))} train.resume=auto")
    cmds += [f"forge generate --checkpoint {out} --max-new-tokens 200",
             f"forge convert --to hf --input {out} --output {shlex.quote(_show(out_dir.rstrip('/') + '-hf'))}",
             f"forge plot {out}"]
    return cmds


def build_summary(result, records: list[dict], n_params: int, tokens: int, tokens_run: int) -> dict:
    """The summary of a `TrainResult` (see module doc); `records` are the run's metrics.jsonl lines,
    `tokens` the run's total, `tokens_run` this call's."""
    cfg = result.config
    vals = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    trains = [r for r in records if isinstance(r.get("loss"), (int, float))]
    best = min(vals, key=lambda sv: (sv[1], sv[0])) if vals else None
    last = vals[-1] if vals else None
    finished = result.step >= cfg.train.max_steps
    status = ("interrupted by " + signal.Signals(result.interrupted).name if result.interrupted
              else "completed" if finished else f"stopped at step {result.step}")
    return {
        "status": status,
        "out_dir": result.out_dir,
        "step": result.step, "max_steps": cfg.train.max_steps, "start_step": result.start_step,
        "steps_run": result.step - result.start_step,
        "tokens": tokens,
        "tokens_run": tokens_run,
        "wall_time_s": round(result.wall_time_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "parameters": n_params,
        "last_train_loss": trains[-1]["loss"] if trains else None,
        "best_val_loss": best[1] if best else None, "best_val_ppl": _ppl(best[1]) if best else None,
        "best_val_step": best[0] if best else None,
        "last_val_loss": last[1] if last else None, "last_val_ppl": _ppl(last[1]) if last else None,
        "last_val_step": last[0] if last else None,
        "checkpoint": result.checkpoint,
        "next": next_commands(result.out_dir, finished),
    }


def format_summary(s: dict) -> str:
    """The summary as the console shows it."""
    rows = [("status", s["status"]),
            ("steps", f"{s['step']} / {s['max_steps']}" + (f" (this call: {s['start_step'] + 1}-{s['step']})"
                                                         if s["start_step"] else "")),
            ("tokens", f"{human(s['tokens'])}" + (f" ({human(s['tokens_run'])} this call)" if s["start_step"] else "")),
            ("wall time", f"{human_duration(s['wall_time_s'])}, {human(s['tokens_per_s'])} tok/s"),
            ("parameters", human(s["parameters"]))]
    if s["last_train_loss"] is not None:
        rows.append(("train loss", f"{s['last_train_loss']:.4f} (last logged)"))
    if s["best_val_loss"] is not None:
        rows.append(("val loss", f"best {s['best_val_loss']:.4f} (ppl {s['best_val_ppl']:.4g}) at step "
                                 f"{s['best_val_step']}; last {s['last_val_loss']:.4f} (ppl {s['last_val_ppl']:.4g}) "
                                 f"at step {s['last_val_step']}"))
    else:
        rows.append(("val loss", "none (no eval has run: train.eval_interval not reached, 0, or no validation split)"))
    rows.append(("checkpoint", _show(s["checkpoint"]) if s["checkpoint"] else "none"))
    lines = [f"run summary: {_show(s['out_dir'])} ({SUMMARY_FILE})"]
    lines += [f"  {k:<11} {v}" for k, v in rows]
    lines += ["next:"] + [f"  {c}" for c in s["next"]]
    return "\n".join(lines)


def write_summary(out_dir: str, summary: dict) -> str:
    """OUT/summary.json (written then renamed); returns its path."""
    path = os.path.join(out_dir, SUMMARY_FILE)
    with atomic_file(path) as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return path
