"""Reading Hugging Face folders (config.json, model.safetensors, sharded safetensors with
model.safetensors.index.json, pytorch_model*.bin), locating an input (a Forge folder, run or step
directory, HF folder or hub repo id) and `from_pretrained`."""
from __future__ import annotations

import os
import re

import torch

from forge.config import ModelConfig
from forge.dtypes import to_dtype
from forge.fsutil import JSONFileError, read_json_object
from forge.models.hf.families import FAMILIES, FamilySpec, UnsupportedModelError
from forge.models.hf.state import hf_to_forge_state_dict
from forge.models.io import FOLDER_CONTENTS, is_forge_folder, load_model_folder, load_state_dict_strict

HF_CONFIG = "config.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- HF folders
def read_json(file: str) -> dict:
    """The JSON object in `file`; a missing, truncated or corrupt file is a ValueError (OSError
    when missing) naming it."""
    try:
        return read_json_object(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file!r} is missing") from None
    except JSONFileError as e:
        raise ValueError(f"{e}; download or copy the folder again") from None


def _load_safetensors(file: str) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; WeightFileError names a truncated or corrupt file."""
    from forge.models.sharded import open_safetensors
    f = open_safetensors(file)
    try:
        return {k: f.get_tensor(k) for k in f.keys()}
    finally:
        f.__exit__(None, None, None)


def read_hf_config(path: str) -> dict:
    return read_json(os.path.join(path, HF_CONFIG))


def family_for(hf_cfg: dict, source: str = "config.json") -> FamilySpec:
    archs = hf_cfg.get("architectures") or []
    if not archs:
        raise UnsupportedModelError(f"{source}: no 'architectures' entry; supported: {sorted(FAMILIES)}")
    if archs[0] not in FAMILIES:
        raise UnsupportedModelError(f"{source}: architecture {archs[0]!r} is not supported; "
                                    f"supported: {sorted(FAMILIES)}")
    return FAMILIES[archs[0]]


def load_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors, sharded safetensors, or pytorch_model*.bin."""
    def shards(index):
        weight_map = read_json(os.path.join(path, index)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{os.path.join(path, index)!r} has no 'weight_map'; download or copy it again")
        return sorted(set(weight_map.values()))
    st = os.path.join(path, "model.safetensors")
    if os.path.isfile(st):
        return _load_safetensors(st)
    if os.path.isfile(st + ".index.json"):
        sd = {}
        for name in shards("model.safetensors.index.json"):
            sd.update(_load_safetensors(os.path.join(path, name)))
        return sd
    bins = ([os.path.join(path, n) for n in shards("pytorch_model.bin.index.json")]
            if os.path.isfile(os.path.join(path, "pytorch_model.bin.index.json"))
            else [os.path.join(path, "pytorch_model.bin")])
    if not all(os.path.isfile(b) for b in bins):
        raise FileNotFoundError(f"{path!r}: no weights (model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin or pytorch_model.bin.index.json)")
    sd = {}
    for b in bins:
        try:
            sd.update(torch.load(b, map_location="cpu", weights_only=True))
        except Exception as e:             # noqa: BLE001 - a truncated zip: RuntimeError, EOFError, ...
            raise ValueError(f"weight file {b!r} cannot be read ({type(e).__name__}: {e}): it is truncated or "
                             "corrupt; download or copy it again") from None
    return sd


def config_from_hf_folder(path: str) -> tuple[FamilySpec, ModelConfig, dict]:
    hf_cfg = read_hf_config(path)
    spec = family_for(hf_cfg, os.path.join(path, HF_CONFIG))
    try:
        cfg = spec.config_from_hf(hf_cfg)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path} ({spec.architecture}): {e}") from None
    return spec, cfg, hf_cfg


def hf_folder_to_forge(path: str, dtype=torch.float32):
    """(ModelConfig, Forge state dict, spec, HF config dict) from an HF folder."""
    from forge.models.hf.quantized import bitnet_offline_to_master
    spec, cfg, hf_cfg = config_from_hf_folder(path)
    hf_sd = bitnet_offline_to_master(hf_cfg, load_hf_state_dict(path))     # packed BitNet: unpacked
    sd = hf_to_forge_state_dict(spec, cfg, hf_sd, to_dtype(dtype), source=path)
    return cfg, sd, spec, hf_cfg


# ---------------------------------------------------------------- locating inputs
def download(repo_id: str) -> str:
    """Local snapshot of a hub repo (config, safetensors weights, tokenizer files); a clear error
    at once when offline or the hub is unreachable, never a hang."""
    from huggingface_hub import snapshot_download

    from forge.hub import endpoint, unreachable_reason
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:                      # noqa: BLE001 - not cached: go on to the network
        pass
    why = unreachable_reason()
    if why:
        raise ConnectionError(f"{repo_id!r} is not a local folder and is not in the Hugging Face cache, and "
                              f"{endpoint()} cannot be reached ({why}); download it elsewhere and pass the folder")
    return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)


def resolve(path: str) -> tuple[str, str]:
    """("forge" | "hf", folder) for a Forge folder, run dir, checkpoint dir, HF folder or hub id."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from forge.models.discovery import find_model_folder
        if os.path.isfile(os.path.join(path, HF_CONFIG)) and not is_forge_folder(path):
            return "hf", path
        folder = find_model_folder(path)             # a step dir (COMPLETE checked), run dir, model folder
        if folder is not None:
            return "forge", folder
        raise FileNotFoundError(f"{path!r} is neither a Forge model folder ({FOLDER_CONTENTS}), a checkpoint "
                                f"step directory (model/), a training run directory (checkpoints/) nor a Hugging "
                                f"Face folder ({HF_CONFIG})")
    if not os.path.exists(path) and _REPO_ID.fullmatch(path) and not path.startswith((".", "/")):
        return "hf", download(path)
    raise FileNotFoundError(f"{path!r} does not exist (and is not a hub repo id of the form org/name)")


def from_pretrained(path, dtype=torch.float32):
    """A Forge model (eval mode) from any supported folder or hub repo id."""
    from forge.models.transformer import build_model
    dtype = to_dtype(dtype)
    kind, folder = resolve(path)
    if kind == "forge":
        return load_model_folder(folder, dtype)[0]
    cfg, sd, _, _ = hf_folder_to_forge(folder, torch.float32)
    model = build_model(cfg, init=False)          # every tensor comes from the folder
    load_state_dict_strict(model, sd, folder)
    return model.to(dtype).eval()
