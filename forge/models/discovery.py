"""Where a training run keeps its checkpoints, shared by training, generation and conversion:

    OUT/checkpoints/step_{step:08d}/{model/, COMPLETE, ...}     (forge.train.checkpoint writes them)
A step dir counts once its COMPLETE marker exists; `model/` is its Forge model folder.
"""
from __future__ import annotations

import os
import re
from typing import Optional

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MODEL_DIR = "model"
STEP_RE = re.compile(r"^step_(\d{8,})$")


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINTS)


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(out_dir), f"step_{step:08d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(out_dir: str, complete_only: bool = True) -> list[tuple[int, str]]:
    """(step, path) of the step dirs under OUT/checkpoints, oldest first."""
    root = checkpoints_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and (is_complete(path) or not complete_only):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run dir, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None
