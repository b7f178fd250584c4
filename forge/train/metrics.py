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
elsewhere each training line is printed. wandb (`log.wandb`) runs offline unless an API key is
configured (WANDB_API_KEY or ~/.netrc), and keeps one run id per out_dir across resumes.
TensorBoard (`log.tensorboard`) writes to OUT/tensorboard.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import sys
from typing import Any, Optional

from forge.config import ConfigError, JobConfig

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
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


class MetricsLogger:
    def __init__(self, cfg: JobConfig, out_dir: str, start_step: int, enabled: bool = True):
        self.enabled, self.cfg, self.out_dir = enabled, cfg, out_dir
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.records: list[dict] = []
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
                post["tok/s"] = f"{tokens_per_s:,.0f}"
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
            val = record["val_loss"]
            self.write(f"step {step}: val_loss {val:.4f}" if val is not None else f"step {step}: val_loss not finite")
        elif self.bar is None:
            total = self.cfg.train.max_steps
            keys = ("loss", "lr", "grad_norm", "tokens_per_s")
            self.write(f"step {step}/{total} | " + " | ".join(f"{k} {_fmt(record[k])}" for k in keys
                                                             if record.get(k) is not None))

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
