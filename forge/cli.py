"""`forge <command> [args]`: parses the command name and delegates to that command's module.

Each command module exposes `main(argv: list[str]) -> int` and owns its own argument parser.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("forge.train.cli", "train a model from a YAML config plus key=value overrides"),
    "generate": ("forge.generate", "sample text from a checkpoint"),
    "steer": ("forge.steer", "extract a steering vector (mean activation difference of two prompt sets)"),
    "eval": ("forge.evaluate", "validation loss / perplexity of a checkpoint, or lm-evaluation-harness tasks"),
    "prepare": ("forge.data.prepare", "tokenize text/jsonl/parquet/arrow into .bin/.idx shards"),
    "convert": ("forge.models.hf.convert", "convert checkpoints to and from Hugging Face folders"),
    "bench": ("forge.bench", "measure training-step throughput against Hugging Face transformers"),
    "plan": ("forge.plan", "per-rank memory of a parallel layout, from its ranks built on the meta device"),
    "plot": ("forge.plot", "draw metrics.jsonl curves (loss, val_loss, lr, ...) of one or several runs into a PNG"),
}


def version_text() -> str:
    """`forge X (torch Y, deepspeed Z, transformers W)`: forge's version and the installed versions
    (package metadata, nothing imported) of the libraries that decide its behaviour."""
    from importlib.metadata import PackageNotFoundError, version

    import forge
    parts = []
    for pkg in ("torch", "deepspeed", "transformers"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    return f"forge {forge.__version__} ({', '.join(parts)})"


def _usage() -> str:
    lines = ["usage: forge <command> [args]", "       forge --version", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher adds --local_rank=N to every process; keep it in LOCAL_RANK."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank", "--local-rank")):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "0")
            skip = "=" not in a
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        print(version_text())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"forge: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from forge.config import ConfigError
    from forge.deepspeed_compat import select_accelerator
    select_accelerator()                # before any command imports deepspeed
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ConfigError as e:
        print(f"forge {name}: config error: {e}", file=sys.stderr)
        return 2
