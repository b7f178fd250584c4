"""Where a training run keeps its checkpoints, shared by training, generation and conversion:

    OUT/checkpoints/step_{step:08d}/{model/, COMPLETE, trainer_state.json, ...}
                                                                (forge.train.checkpoint writes them)
A step dir counts once its COMPLETE marker exists; `model/` is its Forge model folder.
`forge generate`, `forge convert` and `forge.from_pretrained` (and train.init_from, through
convert's resolver) find a model folder through `find_model_folder`, which refuses a step dir
without the marker, or its `model/` folder (`complete_model_folder`); training's train.resume
checks the same marker (`is_complete`).
"""
from __future__ import annotations

import os
import re
from typing import Optional

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
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


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint step dir without its COMPLETE marker (its save was interrupted)."""


def _is_step_dir(path: str) -> bool:
    return bool(STEP_RE.match(os.path.basename(os.path.normpath(path))))


def require_complete(step: str) -> None:
    """Raise IncompleteCheckpointError naming `step` (and the newest complete step beside it)
    unless it holds the COMPLETE marker."""
    if is_complete(step):
        return
    root = os.path.dirname(os.path.normpath(step))
    older = [p for _, p in list_checkpoints(os.path.dirname(root))] if os.path.basename(root) == CHECKPOINTS else []
    hint = f"use an earlier complete one, e.g. {older[-1]!r}" if older else "use an earlier complete checkpoint"
    raise IncompleteCheckpointError(f"checkpoint {step!r} is incomplete (no {COMPLETE} marker: it was being "
                                    f"written when the run stopped); {hint}")


def complete_model_folder(path: str) -> Optional[str]:
    """The model folder that `path` names when it is a checkpoint step dir or the `model/` folder
    of one: `step/model` (or `path` itself), after checking the step's COMPLETE marker (raises
    IncompleteCheckpointError). None when `path` is neither (a plain model folder, a run dir)."""
    norm = os.path.normpath(os.fspath(path))
    if os.path.basename(norm) == MODEL_DIR and _is_step_dir(os.path.dirname(norm)):
        require_complete(os.path.dirname(norm))
        return path
    if os.path.isdir(os.path.join(norm, MODEL_DIR)) and (_is_step_dir(norm) or os.path.exists(
            os.path.join(norm, COMPLETE)) or os.path.exists(os.path.join(norm, STATE_FILE))):
        require_complete(norm)
        return os.path.join(path, MODEL_DIR)
    return None


def newest_checkpoint_model(run_dir: str) -> str:
    """`run_dir/checkpoints/step_*/model` of the newest step with a COMPLETE marker and a Forge
    model folder; FileNotFoundError names the step dirs found when there is none."""
    from forge.models.io import FOLDER_CONTENTS, is_forge_folder
    for _, d in reversed(list_checkpoints(run_dir)):
        if is_forge_folder(os.path.join(d, MODEL_DIR)):
            return os.path.join(d, MODEL_DIR)
    found = [os.path.basename(d) for _, d in list_checkpoints(run_dir, complete_only=False)]
    raise FileNotFoundError(f"{checkpoints_dir(run_dir)!r} holds no complete checkpoint (a step_* folder with a "
                            f"{COMPLETE} marker and a {MODEL_DIR}/ folder with {FOLDER_CONTENTS}); "
                            f"found {found[-8:] or 'no step dirs'}")


def find_model_folder(path: str) -> Optional[str]:
    """The Forge model folder that directory `path` names, in this order: the `model/` of a
    checkpoint step dir (or that `model/` itself; COMPLETE checked), `path` itself, the newest
    complete checkpoint's of a training run dir (OUT/checkpoints/; FileNotFoundError when it
    has none), or `path/model`. None when `path` is none of these."""
    from forge.models.io import is_forge_folder
    step_model = complete_model_folder(path)
    if step_model is not None and is_forge_folder(step_model):
        return step_model
    if is_forge_folder(path):
        return path
    if os.path.isdir(checkpoints_dir(path)):
        return newest_checkpoint_model(path)
    if is_forge_folder(os.path.join(path, MODEL_DIR)):
        return os.path.join(path, MODEL_DIR)
    return None
