"""Forge model folders: `config.yaml` (the job config; at least its `model` section) and
`model.safetensors` (the full, unsharded state dict under Forge's parameter names), plus
tokenizer files when known. Written into a temporary sibling folder and renamed into place, so a
crash never leaves a half-written folder under the final name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil

import torch
import yaml

from forge.config import ModelConfig, model_from_dict
from forge import fsutil
from forge.fsutil import save_safetensors
from forge.models.sharded import INDEX_FILE

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
FOLDER_CONTENTS = f"{CONFIG_FILE} + {WEIGHTS_FILE}, or {CONFIG_FILE} + a sharded checkpoint's {INDEX_FILE}"
# safetensors' dtype names (its header's "dtype" field)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class WriteError(OSError):
    """Writing a checkpoint or an export failed; the message names the path and, for ENOSPC,
    says the disk is full. `errno` is kept (ENOSPC where the writer reported no space)."""

    def __str__(self) -> str:
        return self.strerror


def _no_space(e: BaseException) -> bool:
    # OSError from Python writes; safetensors' Rust writer reports "No space left on device (os
    # error 28)"; torch.save's zip writer reports only "unexpected pos N vs M" (short write)
    text = str(e)
    return getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text


def describe_write_error(e: BaseException, where: str) -> str:
    """A one-line account of a failed write under `where`: the file (when known), "disk full"
    for ENOSPC, and what to do."""
    file = getattr(e, "filename", None)
    at = f"{file!r}" if file and os.path.abspath(str(file)) != os.path.abspath(where) else f"{where!r}"
    if file and at != f"{where!r}":
        at += f" (under {where!r})"
    if _no_space(e):
        return (f"disk full (ENOSPC: no space left on device) while writing {at}; free space on that disk or "
                "write to another one")
    if "unexpected pos" in str(e):          # torch.save: a short write (usually a full disk or quota)
        return f"short write while writing {at} ({e}): is the disk or quota full?; free space or write elsewhere"
    reason = getattr(e, "strerror", None) or str(e)
    return f"cannot write {at}: {reason}"


@contextlib.contextmanager
def writing(where: str, under: str | None = None):
    """Turn an error of the writes inside into WriteError(describe_write_error): OSError, and
    the errors of safetensors' and torch.save's writers that stand for one. With `under`, an
    OSError naming a file outside that folder (a read of an input) passes through unchanged."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        file = getattr(e, "filename", None)
        if under and file and not _no_space(e) and not os.path.abspath(str(file)).startswith(
                os.path.abspath(under) + os.sep):
            raise
        raise WriteError(e.errno or errno.EIO, describe_write_error(e, where)) from e
    except Exception as e:          # noqa: BLE001 - SafetensorError, torch's RuntimeError
        if _no_space(e) or "unexpected pos" in str(e):
            raise WriteError(errno.ENOSPC if _no_space(e) else errno.EIO, describe_write_error(e, where)) from e
        raise


@contextlib.contextmanager
def atomic_dir(out: str, force: bool = False):
    """fsutil.atomic_dir (a temporary sibling renamed into place) with the writes inside turned
    into WriteError (`writing`; a read of an input outside the folder passes through)."""
    with fsutil.atomic_dir(out, force) as tmp, writing(out, under=tmp):
        yield tmp


def is_forge_folder(path: str) -> bool:
    """config.yaml with model.safetensors, or with a sharded checkpoint's forge_index.json."""
    from forge.models.sharded import is_sharded_folder
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and (
        os.path.isfile(os.path.join(path, WEIGHTS_FILE)) or is_sharded_folder(path))


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (the tied head is rebuilt from the embedding)."""
    sd, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        sd[name] = t.detach().contiguous()
    return sd


def save_model_folder(model, cfg_dict: dict, path: str, tokenizer_dir: str | None = None) -> None:
    """Write `model` (unsharded) with its config to `path`, atomically."""
    save_state_folder(unique_state_dict(model), cfg_dict, path, tokenizer_dir)


def save_state_folder(state: dict[str, torch.Tensor], cfg_dict: dict, path: str,
                      tokenizer_dir: str | None = None) -> None:
    """Write a full Forge state dict with its config to `path`, atomically (replacing it)."""
    with atomic_dir(path, force=True) as tmp:
        save_safetensors({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            yaml.safe_dump(cfg_dict, f, sort_keys=False)
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a Forge model folder's config.yaml; a missing, unparsable or
    non-mapping file is a ConfigError naming it."""
    from forge.config import ConfigError
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            tree = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{file!r} is missing; a Forge model folder holds {FOLDER_CONTENTS}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{file!r} does not parse as YAML ({e}): it is truncated or corrupt; copy it again "
                          "(a checkpoint's run dir holds the same config as config.yaml)") from None
    model = tree.get("model", tree) if isinstance(tree, dict) else tree
    if not isinstance(model, dict):
        raise ConfigError(f"{file!r}: expected a mapping of model.* keys, got {type(model).__name__}; copy it again")
    model = {k: v for k, v in model.items() if k != "preset"}   # the resolved fields are all there
    return model_from_dict(model, prefix=f"{path}/{CONFIG_FILE}: model").validate()


def _check_names(expected: set, found: set, source: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into `model`, naming any missing, unexpected or mis-shaped tensor."""
    expected = unique_state_dict(model)
    _check_names(set(expected), set(sd), source)
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, t in sd.items():
            expected[name].copy_(t)


def weight_dtypes(path: str) -> dict[str, torch.dtype]:
    """The stored dtype of every tensor of a Forge model folder (one file or sharded), read from
    the index or the safetensors header alone (no tensor data)."""
    from forge.models.sharded import is_sharded_folder, open_safetensors, read_index
    if is_sharded_folder(path):
        return {k: getattr(torch, e["dtype"]) for k, e in read_index(path)["tensors"].items()}
    f = open_safetensors(os.path.join(path, WEIGHTS_FILE))
    try:
        return {k: SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()] for k in f.keys()}
    finally:
        f.__exit__(None, None, None)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Forge model folder (one file or sharded), whole, by Forge name."""
    from forge.models.sharded import WeightReader
    with WeightReader(path) as reader:
        return {name: reader.get(name) for name in reader.names()}


def load_model_folder(path: str, dtype: torch.dtype = torch.float32):
    """(model, ModelConfig) from a Forge model folder (one file or sharded), read tensor by
    tensor into a model built without initialisation."""
    from forge.models.sharded import WeightReader
    from forge.models.transformer import build_model
    if not is_forge_folder(path):
        raise FileNotFoundError(f"{path!r} is not a Forge model folder (needs {FOLDER_CONTENTS})")
    cfg = read_model_config(path)
    model = build_model(cfg, init=False)          # every tensor comes from the folder
    with WeightReader(path) as reader:
        expected = unique_state_dict(model)
        _check_names(set(expected), set(reader.names()), path)
        with torch.no_grad():
            for name, t in expected.items():
                value = reader.get(name)
                if tuple(value.shape) != tuple(t.shape):
                    raise ValueError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(t.shape)}")
                t.copy_(value)
                del value
                reader.close()      # unmap the files read so far: their pages would stay resident
    return model.to(dtype).eval(), cfg


def model_config_dict(cfg: ModelConfig) -> dict:
    return {"model": dataclasses.asdict(cfg)}
