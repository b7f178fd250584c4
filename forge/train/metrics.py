"""Run logging on rank 0: OUT/metrics.jsonl, a progress bar, wandb and TensorBoard.

metrics.jsonl holds one JSON object per line: a training line every `train.log_interval` steps
(`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `tokens`, `elapsed_s`, and `skipped_steps`: the
updates skipped so far for a non-finite loss or gradient norm, forge.train.nonfinite), also for
every skipped step (then with `skipped`: why, and `skipped_in_a_row`; `loss` is the mean of the
finite losses since the last line), and an eval line (`step`, `val_loss`, `val_ppl`) every
`train.eval_interval` steps and at the end. Non-finite values are written as null. On resume the
lines after the resumed step (written by the interrupted run after its last checkpoint) are dropped,
so the file reads as one uninterrupted run.

The progress bar (tqdm, on a terminal with `log.progress`) shows the step, loss, lr and tokens/s;
elsewhere (nohup, SLURM, `log.progress=false`) each training line is printed with the elapsed time
and an ETA, `(max_steps - step) * (seconds since this call started) / (steps this call ran)`.
Counts are printed human-readable (`human`: 15.4k tok/s, 1.2M tokens); every eval prints val_loss
and val_ppl = exp(val_loss). With matplotlib installed (`log.plot`), OUT/loss.png is redrawn at each
eval (`forge.plot`); a failure there is reported, never raised.

wandb (`log.wandb`) runs offline unless an API key is configured (WANDB_API_KEY or ~/.netrc), and
keeps one run id per out_dir across resumes.
TensorBoard (`log.tensorboard`) writes to OUT/tensorboard.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from typing import Any, Optional

from forge.config import ConfigError, JobConfig
from forge.fsutil import atomic_file

METRICS_FILE = "metrics.jsonl"


def check_logging_available(cfg: JobConfig) -> None:
    """Fail before any work when a requested logger is not installed."""
    if cfg.log.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("log.wandb=true but wandb is not installed: pip install wandb") from None
    if cfg.log.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("log.tensorboard=true but tensorboard is not installed: pip install tensorboard") from None


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def read_metrics(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate(path: str, last_step: int) -> None:
    """Keep only the lines with step <= last_step (all lines dropped for a fresh start)."""
    keep = []
    if last_step > 0 and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= last_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue                         # a line cut by a crash
    with atomic_file(path) as f:
        f.writelines(keep)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def human(v: float) -> str:
    """A count to 3 significant figures with a k/M/B/T suffix (powers of 1000), the suffix chosen so
    that the shown mantissa is below 1000: 950 -> "950", 15440 -> "15.4k", 999999 -> "1M",
    1.2e6 -> "1.2M", 3.45e9 -> "3.45B"; a non-integer below 1000 keeps 3 figures (12.34 -> "12.3")."""
    units, x, i = ("", "k", "M", "B", "T"), float(v), 0
    while i < len(units) - 1 and abs(float(f"{x:.3g}")) >= 1000:
        x, i = x / 1000, i + 1
    if i == 0 and float(v).is_integer():
        return str(int(v))
    return (f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}") + units[i]


def human_duration(seconds: float) -> str:
    """Seconds as "45s", "3m05s", "1h02m" or "2d03h" (two units at most, the smaller one truncated)."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class MetricsLogger:
    def __init__(self, cfg: JobConfig, out_dir: str, start_step: int, enabled: bool = True):
        self.enabled, self.cfg, self.out_dir = enabled, cfg, out_dir
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.records: list[dict] = []
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.best_val: Optional[tuple[int, float]] = None         # (step, val_loss) of this call
        self.bar = self.wandb_run = self.tb = None
        if not enabled:
            return
        _truncate(self.path, start_step)
        self.file = open(self.path, "a")
        if cfg.log.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        if cfg.log.wandb:
            self._init_wandb()
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)

    def _init_wandb(self) -> None:
        import wandb
        id_file = os.path.join(self.out_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if os.path.isfile(id_file) else None
        if run_id is None:
            run_id = wandb.util.generate_id() if hasattr(wandb, "util") else os.urandom(4).hex()
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_key() else "offline")
        self.wandb_run = wandb.init(project=self.cfg.log.wandb_project, name=os.path.basename(os.path.abspath(self.out_dir)),
                                    id=run_id, resume="allow", dir=self.out_dir, mode=mode, config=self.cfg.to_dict())

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: Optional[float]) -> None:
        """Per-step progress-bar update."""
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
            if tokens_per_s:
                post["tok/s"] = human(tokens_per_s)
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)

    def log(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(("eval/" if k.startswith("val_") else "train/") + k, v, step)
        if "val_loss" in record:
            self.write(self.val_line(record))
            if self.cfg.log.plot:
                from forge.plot import write_loss_png
                error = write_loss_png(self.out_dir)
                if error:
                    self.write(f"warning: {error}")
        elif self.bar is None:
            self.write(self.train_line(record))

    def val_line(self, record: dict) -> str:
        """`step 250: val_loss 1.5910 | val_ppl 4.909 (best 1.5800 at step 200)`."""
        step, val = record["step"], record["val_loss"]
        if val is None:
            return f"step {step}: val_loss nan"
        if self.best_val is None or val < self.best_val[1]:
            self.best_val = (step, val)
        line = f"step {step}: val_loss {val:.4f} | val_ppl {math.exp(min(val, 50.0)):.4g}"
        if self.best_val[0] != step:
            line += f" (best {self.best_val[1]:.4f} at step {self.best_val[0]})"
        return line

    def train_line(self, record: dict) -> str:
        """`step 10/200 | loss 2.345 | lr 0.0003 | grad_norm 0.81 | 15.4k tok/s | 1.2M tokens |
        elapsed 1m02s | eta 20m10s`; the ETA extrapolates this call's seconds per step."""
        step, total = record["step"], self.cfg.train.max_steps
        parts = [f"step {step}/{total}"]
        parts += [f"{k} {_fmt(record[k])}" for k in ("loss", "lr", "grad_norm") if record.get(k) is not None]
        if record.get("tokens_per_s"):
            parts.append(f"{human(record['tokens_per_s'])} tok/s")
        if record.get("tokens") is not None:
            parts.append(f"{human(record['tokens'])} tokens")
        if record.get("elapsed_s") is not None:
            parts.append(f"elapsed {human_duration(record['elapsed_s'])}")
        done = step - self.start_step
        if done > 0 and step < total:
            per_step = (time.perf_counter() - self.t0) / done
            parts.append(f"eta {human_duration(per_step * (total - step))}")
        return " | ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
