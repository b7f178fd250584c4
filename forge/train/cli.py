"""`forge train [CONFIG] [key=value ...]`: train from a YAML config plus dotted overrides.

    forge train configs/shakespeare_char.yaml train.max_steps=200 optim.lr=1e-3
    forge train model.preset=... train.out_dir=runs/x train.resume=auto     # no file: defaults + overrides

Runs as a plain process (it becomes rank 0 of a world of 1) or under a DeepSpeed / torchrun launcher.
Exit status: 0 when done, 2 for a config or checkpoint problem or an out_dir locked by another
run (nothing written), 3 when training diverged (train.max_skipped_steps non-finite steps in a row, or
non-finite weights at a save: no checkpoint of them is written), 128 + signal number when stopped
by SIGINT / SIGTERM (after saving a checkpoint; without one when the step did not finish within
train.stop_timeout_s of the signal, or on a second signal: forge.train.signals), 124 when the step
watchdog ended a stalled rank (train.step_timeout_s, forge.train.watchdog), 1 for other errors (a
collective that timed out after train.collective_timeout_s among them).

In a job of several processes a rank that fails with an unexpected exception writes its traceback
and ends at once (`os._exit`, no interpreter teardown: the destructors of process groups and
DeepSpeed's engine, atexit handlers and leftover threads can wait for peers that wait for it), so
the launcher sees it gone and tears the job down (or restarts it, torchrun --max-restarts) instead
of the other ranks waiting in a collective until train.collective_timeout_s.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import yaml

from forge.config import (ConfigError, add_config_arguments, config_arguments, config_yaml, flatten_dict,
                          load_config, parse_overrides)


def user_keys(path: str | None, overrides: list[str]) -> frozenset:
    """The dotted keys the YAML file and the overrides set (presets do not count)."""
    tree: dict = {}
    if path:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    return frozenset(flatten_dict(tree if isinstance(tree, dict) else {})) | frozenset(
        flatten_dict(parse_overrides(overrides)))


def _report(kind: str, e: ConfigError) -> None:
    """Print a config/checkpoint error once: every rank finds the same one (same config, same
    files), so rank 0 prints it; an error that only this rank can see (`e.rank_local`, e.g. its
    own RNG file) is printed by the rank that found it, prefixed with its rank."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        print(f"forge train: {kind}: {e}", file=sys.stderr)
    elif getattr(e, "rank_local", False):
        print(f"forge train: rank {rank}: {kind}: {e}", file=sys.stderr)


def exit_now(e: BaseException) -> None:
    """End this rank of a multi-process job at once with `e`'s traceback (module doc): status 1,
    130 for KeyboardInterrupt."""
    rank = os.environ.get("RANK", "?")
    try:
        sys.stdout.flush()
        sys.stderr.write(f"forge train: rank {rank}: failed; exiting now so that the launcher ends the job\n"
                         + "".join(traceback.format_exception(e)))
        sys.stderr.flush()
    finally:
        os._exit(130 if isinstance(e, KeyboardInterrupt) else 1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forge train",
        description="Train a model from a YAML config (optional) plus key=value overrides, e.g. "
                    "`forge train configs/shakespeare_char.yaml train.max_steps=200 optim.lr=1e-3`. "
                    "Common keys: model.preset, train.max_steps, train.out_dir, train.seed, "
                    "train.resume (none | auto | PATH), optim.lr, parallel.zero_stage.",
        epilog="Every key, its type, default and meaning: docs/config.md (regenerate with `python -m forge.docs`). "
               "`--print-config` prints the config that would run (defaults < model.preset < YAML < overrides), with "
               "keys the chosen options never read marked `# unused`, and exits without training; the run saves the "
               "same text as OUT/config.yaml. The run prints a summary at the end and writes OUT/summary.json, "
               "OUT/metrics.jsonl and (with matplotlib) OUT/loss.png; `forge plot OUT` draws its curves.")
    add_config_arguments(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, unused keys marked) and exit without training")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    path, overrides = config_arguments(args)
    try:
        cfg = load_config(path, overrides)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        explicit = user_keys(path, overrides)
        from forge.train.checkpoint import CheckpointError
        from forge.train.nonfinite import NonFiniteError
        from forge.train.runlock import RunLockError
        from forge.train.trainer import train
        try:
            result = train(cfg, explicit_vocab="model.vocab_size" in explicit, explicit=explicit)
        except RunLockError as e:
            print(f"forge train: run dir locked: {e}", file=sys.stderr)
            return 2
        except NonFiniteError as e:
            print(f"forge train: training diverged: {e}", file=sys.stderr)
            return 3
        except CheckpointError as e:
            _report("checkpoint error", e)
            return 2
        except (ConfigError, SystemExit):
            raise
        except BaseException as e:
            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                exit_now(e)
            raise
    except ConfigError as e:
        _report("config error", e)
        return 2
    if result.interrupted:
        return 128 + int(result.interrupted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
