"""Forge model folders: `config.yaml` (the job config; at least its `model` section) and
`model.safetensors` (the full, unsharded state dict under Forge's parameter names), plus
tokenizer files when known. Written into a temporary sibling folder and renamed into place, so a
crash never leaves a half-written folder under the final name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import yaml

from forge.config import ModelConfig, model_from_dict
from forge.fsutil import make_temp_dir, save_safetensors
from forge.models.sharded import INDEX_FILE

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
FOLDER_CONTENTS = f"{CONFIG_FILE} + {WEIGHTS_FILE}, or {CONFIG_FILE} + a sharded checkpoint's {INDEX_FILE}"
# safetensors' dtype names (its header's "dtype" field)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


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
    """Write a full Forge state dict with its config to `path`, atomically."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, prefix=".tmp-")
    try:
        save_safetensors({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            yaml.safe_dump(cfg_dict, f, sort_keys=False)
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_model_config(path: str) -> ModelConfig:
    with open(os.path.join(path, CONFIG_FILE)) as f:
        tree = yaml.safe_load(f) or {}
    model = tree.get("model", tree)
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
    from safetensors import safe_open

    from forge.models.sharded import is_sharded_folder
    if is_sharded_folder(path):
        with open(os.path.join(path, INDEX_FILE)) as f:
            return {k: getattr(torch, e["dtype"]) for k, e in json.load(f)["tensors"].items()}
    with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
        return {k: SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()] for k in f.keys()}


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
