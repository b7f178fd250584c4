"""`forge eval CHECKPOINT`: loss and perplexity of a checkpoint on its run's validation data, or
lm-evaluation-harness tasks (`--tasks`, forge.lm_harness).

    forge eval runs/x                                   # newest complete checkpoint of a run
    forge eval runs/x/checkpoints/step_00000300 --split test --max-batches 50
    forge eval hf_or_forge_folder --data shards/a shards/b --batch-size 8
    forge eval runs/x --tasks my_task --include-path tasks/ --limit 100

Which data: the run's config.yaml (the checkpoint's model/config.yaml holds the whole job config;
else the first config.yaml with a `data` section in the folders above it), or `--data PATH...`
(forge prepare folders, replacing data.paths with data.dataset=indexed; the split fractions,
seq_len and seed stay the run's, or the defaults without a run config).

The number is the trainer's validation loss, computed by the trainer's own code
(forge.train.step.evaluate) over a plain model standing in for the engine:

    loss = mean over the n micro batches b of  mean_{i,t} -log softmax(f(x_b)[i, t])[x_b[i, t+1]]
    ppl  = exp(loss)

where the micro batches are the first `train.eval_steps` global batches of the split
(`--max-batches`), micro_batch_size sequences each (`--batch-size`), taken by rank r of the
run's dp ranks as in training: the ranks are emulated one after another in this process and
their means averaged (the trainer's all-reduce), and a pipeline-trained run's count is rounded
to whole pipeline schedules as the trainer does. So with the run's settings the result equals
the val_loss in metrics.jsonl at the checkpoint's step (in fp32; a bf16 run evaluated under
--dtype bf16 is close, not equal: the engine's mixed precision differs from a bf16 model).

Layouts: one process reads any checkpoint (each tp/pp/ep layout writes the sharded format that
forge.models.sharded.WeightReader assembles), so eval runs single-process for every layout.
Bad input: a clear message naming the flag, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import torch

from forge.dtypes import DTYPES
from forge.generate import device_value, positive_int

SPLITS = ("valid", "test")


class ModelEngine:
    """The part of a DeepSpeed engine that forge.train.step.evaluate uses (calling it, .module
    for the loss, .device, train()/eval()), over a plain model in one process."""

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self.device = next(model.parameters()).device

    def __call__(self, ids):
        return self.module(ids)

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


class PipelineModelEngine(ModelEngine):
    """A ModelEngine that, like DeepSpeed's PipelineEngine, evaluates a schedule of micro batches
    at once: eval_batch returns the mean loss of the (inputs, labels) pairs it is given."""

    def eval_batch(self, data_iter):
        losses = [self.module.loss(self.module(x.to(self.device)), y.to(self.device)).item() for x, y in data_iter]
        return sum(losses) / len(losses)


# ---------------------------------------------------------------- locating the run's settings
def find_run_config(folder: str, levels: int = 3) -> Optional[str]:
    """The first config.yaml with a `data` section in `folder` or up to `levels` folders above
    it (model/ -> step_N/ -> checkpoints/ -> the run dir), or None."""
    import yaml
    d = os.path.abspath(folder)
    for _ in range(levels + 1):
        path = os.path.join(d, "config.yaml")
        if os.path.isfile(path):
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
            if isinstance(tree, dict) and isinstance(tree.get("data"), dict):
                return path
        d = os.path.dirname(d)
    return None


def checkpoint_state(folder: str) -> dict:
    """The trainer's state.json of the checkpoint step dir above a model folder ({} if none)."""
    from forge.models.discovery import STATE_FILE
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), STATE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def eval_config(model_cfg, run_config: Optional[str], args):
    """The job config eval runs under: the run's (or defaults), with the checkpoint's model and
    the flags applied. Raises ValueError naming the flag on a bad combination."""
    import dataclasses
    from forge.config import JobConfig, load_config
    cfg = load_config(run_config) if run_config else JobConfig()
    cfg.model = dataclasses.replace(model_cfg)
    if args.data:
        cfg.data.dataset, cfg.data.paths, cfg.data.blend = "indexed", list(args.data), None
    elif run_config is None:
        raise ValueError("no run config.yaml with a data section next to or above the checkpoint: give the "
                         "validation shards with --data PATH [PATH ...]")
    if args.batch_size is not None:
        cfg.train.micro_batch_size = args.batch_size
    if args.max_batches is not None:
        cfg.train.eval_steps = args.max_batches
    elif run_config is None:
        cfg.train.eval_steps = 2 ** 62           # no run to follow: the whole split (min'd by evaluate)
    cfg.data.seq_len = cfg.data.seq_len or model_cfg.max_seq_len
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} of the run is longer than the model's context "
                         f"({model_cfg.max_seq_len})")
    if cfg.data.dataset == "shakespeare" and args.split == "test":
        raise ValueError("--split test: the embedded Shakespeare data has no test split (only valid)")
    return cfg


# ---------------------------------------------------------------- the loss
def validation_loss(model, split_data, cfg, dp_size: int = 1, pipeline: bool = False) -> float:
    """forge.train.step.evaluate over `model` for each of `dp_size` emulated data-parallel
    ranks, averaged as the trainer's all-reduce does (see the module doc)."""
    from forge.train.step import evaluate
    engine = PipelineModelEngine(model) if pipeline else ModelEngine(model)
    losses = [evaluate(engine, split_data, cfg, r, dp_size) for r in range(dp_size)]
    if losses[0] is None:
        raise ValueError("the split is empty (or --max-batches is 0)")
    return sum(losses) / dp_size


def evaluate_checkpoint(checkpoint: str, args) -> dict:
    """Load `checkpoint` (any form forge generate takes), find its data, return a result dict
    {loss, ppl, split, batches, sequences, tokens, seconds, ...}."""
    from forge.data import build_data
    from forge.generate import load_for_generation
    t0 = time.perf_counter()
    dtype = DTYPES[args.dtype]
    model, tok, folder = load_for_generation(checkpoint, args.device, dtype, flag="CHECKPOINT")
    run_config = find_run_config(folder)
    cfg = eval_config(model.cfg, run_config, args)
    state = checkpoint_state(folder)
    dp = args.dp if args.dp is not None else int(state.get("dp_size", 1))
    pipeline = cfg.parallel.pp > 1
    work_dir = cfg.train.out_dir if os.path.isdir(cfg.train.out_dir or "") else os.path.dirname(os.path.abspath(folder))
    bundle = build_data(cfg.data, seed=cfg.train.seed, work_dir=work_dir)
    data = getattr(bundle, args.split)
    if data is None or len(data) == 0:
        raise ValueError(f"--split {args.split}: the data has no {args.split} split (data.split={cfg.data.split})")
    if bundle.tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the data's tokenizer has {bundle.tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary of {model.cfg.vocab_size}: --data was tokenized for another model")
    if tok.sha256() != bundle.tokenizer.sha256():
        print("forge eval: warning: the data was prepared with another tokenizer than the checkpoint's",
              file=sys.stderr)
    loss = validation_loss(model, data, cfg, dp, pipeline)
    B = cfg.train.micro_batch_size
    n = min(cfg.train.eval_steps, max(1, math.ceil(len(data) / (B * dp))))
    if pipeline:
        n = max(1, n // cfg.train.grad_accum) * cfg.train.grad_accum
    return {"checkpoint": folder, "step": state.get("step"), "split": args.split, "loss": loss,
            "ppl": math.exp(min(loss, 50.0)), "batches": n, "dp": dp, "micro_batch_size": B,
            "sequences": n * B * dp, "tokens": n * B * dp * cfg.data.seq_len, "seq_len": cfg.data.seq_len,
            "run_config": run_config, "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="training run dir, checkpoint step dir, Forge model folder, or Hugging Face "
                                      "folder / hub repo id")
    p.add_argument("--data", nargs="+", metavar="PATH", help="forge prepare folders to evaluate on instead of the "
                                                             "run's data (its split fractions apply)")
    p.add_argument("--split", choices=SPLITS, default="valid")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="global batches to evaluate (default: the run's train.eval_steps; the whole split "
                        "without a run config)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sequences per micro batch (default: the run's train.micro_batch_size); with --tasks: "
                        "requests per forward pass (default 8)")
    p.add_argument("--dp", type=positive_int, default=None,
                   help="data-parallel ranks to emulate (default: the checkpoint's, as its training evaluated)")
    p.add_argument("--device", type=device_value, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    h = p.add_argument_group("lm-evaluation-harness (pip install 'forge[eval]')")
    h.add_argument("--tasks", help="comma-separated lm_eval task names (or task YAML files)")
    h.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAMLs for lm_eval's TaskManager (repeatable)")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    h.add_argument("--seed", type=int, default=0, help="lm_eval's random / numpy / torch / fewshot seeds")
    h.add_argument("--output", help="write lm_eval's results to this JSON file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tasks:
        if args.data or args.max_batches or args.dp or args.split != "valid":
            print("forge eval: --tasks runs lm-evaluation-harness tasks; --data, --split, --max-batches and --dp "
                  "belong to the validation loss", file=sys.stderr)
            return 2
        from forge.lm_harness import main_tasks
        return main_tasks(args)
    from forge.config import ConfigError
    try:
        res = evaluate_checkpoint(args.checkpoint, args)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"forge eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    else:
        step = f" (step {res['step']})" if res["step"] is not None else ""
        print(f"{res['checkpoint']}{step}: {res['split']} loss {res['loss']:.6f}, ppl {res['ppl']:.4f} over "
              f"{res['batches']} batches x {res['dp']} dp x {res['micro_batch_size']} sequences x {res['seq_len']} "
              f"tokens ({res['tokens']} tokens, {res['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
