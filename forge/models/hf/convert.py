"""Hugging Face <-> Forge conversion, driven by the family specs in `families.py`.

    forge convert --from hf --input HF_DIR|ORG/NAME --output FORGE_DIR [--dtype fp32] [--force]
    forge convert --to hf   --input FORGE_DIR|RUN_DIR|STEP_DIR --output HF_DIR [--max-shard-size 5GB]
                            [--dtype bf16] [--arch X] [--force] [--quantized]
    forge.from_pretrained(path, dtype=torch.float32) -> Transformer   (ids (B, T) -> logits (B, T, V))

`path` may be a Forge model folder (config.yaml + model.safetensors, or a checkpoint's sharded
config.yaml + forge_index.json + shard-*.safetensors), a training run directory (the newest
`checkpoints/step_*/` holding a COMPLETE marker and a `model/` Forge folder), a checkpoint step
directory, a Hugging Face folder (config.json + model.safetensors or sharded safetensors with
model.safetensors.index.json) or a hub repo id (downloaded unless offline).
Every HF tensor must be consumed and every Forge tensor produced; anything else is an error that
names the tensors (and both shapes on a shape mismatch). Outputs are written to a temporary
sibling folder and renamed into place.

`--to hf` streams: the Forge weights are read tensor by tensor (WeightReader), each rule of the
family (a rename or a Transform) turns the Forge tensors it needs into its HF tensors, and those
go straight to disk into safetensors shards of at most --max-shard-size (HF's file names and
model.safetensors.index.json; one model.safetensors when everything fits). The process holds
one rule's inputs and outputs at a time, never the model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import yaml

from forge.config import ModelConfig
from forge.dtypes import DTYPES, to_dtype
from forge.fsutil import JSONFileError, read_json_object, save_safetensors
from forge.models.hf.families import FAMILIES, FamilySpec, Transform, UnsupportedModelError, representation_errors
from forge.models.hf.quantized import QuantizedWeights, export_plan
from forge.models.io import (CONFIG_FILE, FOLDER_CONTENTS, SAFETENSORS_DTYPES, WEIGHTS_FILE, WriteError, atomic_dir,
                             is_forge_folder,
                             load_model_folder, load_state_dict_strict, model_config_dict, read_model_config,
                             unique_state_dict, weight_dtypes)

HF_CONFIG = "config.json"
HF_SOURCE = "hf_source.json"          # sidecar in a Forge folder converted from HF: architecture + token ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- rules
def _expand(t: Transform, cfg: ModelConfig):
    """(hf_keys, forge_keys) per layer for a layer template ("{i}"), once otherwise; a key with the
    expert placeholder "{e}" stands for n_experts keys (experts 0..E-1, in order)."""
    def fill(keys, i):
        return tuple(k.format(i=i, e=e) for k in keys
                     for e in (range(cfg.moe.n_experts) if "{e}" in k else (None,)))
    if any("{i}" in k for k in t.hf + t.forge):
        return [(fill(t.hf, i), fill(t.forge, i)) for i in range(cfg.n_layers)]
    return [(fill(t.hf, None), fill(t.forge, None))]


def _all_rules(spec: FamilySpec) -> list[Transform]:
    renames = [Transform("rename", (hf,), (fg,), lambda ts, cfg: list(ts), lambda ts, cfg: list(ts))
               for hf, fg in spec.key_map.items()]
    return renames + list(spec.transforms)


def forge_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Names and shapes of the Forge state dict for `cfg` (built on the meta device: no memory)."""
    from forge.models.transformer import build_model
    model = build_model(cfg, device="meta")
    return {k: tuple(v.shape) for k, v in unique_state_dict(model).items()}


class Plan(NamedTuple):
    rules: list          # active rules [(transform, hf_keys, forge_keys)], in order
    shapes: dict         # Forge name -> shape
    hf: dict             # HF name -> (shape, dtype), in the order the rules produce them
    owner: dict          # HF name -> the Forge names it feeds


def plan(spec: FamilySpec, cfg: ModelConfig, dtypes: dict | None = None) -> Plan:
    """Active rules, Forge shapes, the HF shapes and dtypes they imply (from Forge tensors of the
    dtypes in `dtypes`, by Forge name, default float32) and which Forge tensors each HF one feeds."""
    shapes = forge_shapes(cfg)
    dtypes = dtypes or {}
    rules, produced = [], set()
    for t in _all_rules(spec):
        for hk, fk in _expand(t, cfg):
            present = [k in shapes for k in fk]
            if not all(present):
                if any(present):
                    raise UnsupportedModelError(f"{spec.architecture}: transform {t.name} needs Forge tensors "
                                                f"{list(fk)} but the model has only {[k for k in fk if k in shapes]}")
                continue
            dup = produced.intersection(fk)
            if dup:
                raise RuntimeError(f"{spec.architecture}: Forge tensors {sorted(dup)} are produced by two rules")
            produced.update(fk)
            rules.append((t, hk, fk))
    unmapped = sorted(set(shapes) - produced)
    if unmapped:
        raise UnsupportedModelError(f"{spec.architecture}: no Hugging Face tensor maps to the Forge tensors {unmapped}")
    hf, owner = {}, {}
    for t, hk, fk in rules:
        outs = t.to_hf([torch.empty(shapes[k], dtype=dtypes.get(k, torch.float32), device="meta") for k in fk], cfg)
        for k, o in zip(hk, outs):
            if k in hf:
                raise RuntimeError(f"{spec.architecture}: HF tensor {k!r} is consumed by two rules")
            hf[k], owner[k] = (tuple(o.shape), o.dtype), fk
    return Plan(rules, shapes, hf, owner)


# ---------------------------------------------------------------- state dicts
def _add_base_prefix(spec: FamilySpec, sd: dict, hf_shapes: dict) -> dict:
    """Checkpoints saved from the base model (e.g. GPT-2's `h.0...`, `wte.weight`) lack its prefix."""
    p = spec.base_prefix
    if not p or any(k.startswith(p) for k in sd):
        return sd
    top = {k for k in hf_shapes if not k.startswith(p)}
    return {(k if k in top else p + k): v for k, v in sd.items()}


def hf_to_forge_state_dict(spec: FamilySpec, cfg: ModelConfig, hf_sd: dict, dtype=torch.float32,
                           source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Forge state dict from an HF one; errors name every missing / unexpected / mis-shaped tensor."""
    rules, _, hf, owner = plan(spec, cfg)
    hf_shapes = {k: shape for k, (shape, _) in hf.items()}
    hf_sd = _add_base_prefix(spec, hf_sd, hf_shapes)
    for alt, key in spec.aliases.items():
        if alt in hf_sd and key not in hf_sd:
            hf_sd = {(key if k == alt else k): v for k, v in hf_sd.items()}
    ignore = [re.compile(r) for r in spec.ignore]
    embed_key = next((hk[0] for t, hk, fk in rules if fk == ("embed.tok.weight",)), None)
    missing = [k for k in hf_shapes if k not in hf_sd]
    unexpected = []
    for k, v in hf_sd.items():
        if k in hf_shapes or any(r.fullmatch(k) for r in ignore):
            continue
        if cfg.tie_embeddings and k in spec.tied_hf_keys and embed_key in hf_sd:
            if v.shape == hf_sd[embed_key].shape and torch.equal(v, hf_sd[embed_key]):
                continue              # the tied head saved alongside the embedding: the same tensor
            raise ValueError(f"{source}: tie_word_embeddings is true but {k!r} differs from {embed_key!r}")
        unexpected.append(k)
    if missing or unexpected:
        raise ValueError(f"{source} ({spec.architecture}): missing tensors {_names(missing)}, "
                         f"unexpected tensors {_names(unexpected)}")
    for k, shape in hf_shapes.items():
        if tuple(hf_sd[k].shape) != shape:
            raise ValueError(f"{source} ({spec.architecture}): tensor {k!r} has shape {tuple(hf_sd[k].shape)}, "
                             f"the config implies {shape} (for Forge {', '.join(owner[k])})")
    out = {}
    for t, hk, fk in rules:
        for k, o in zip(fk, t.to_forge([hf_sd[k] for k in hk], cfg)):
            out[k] = o.to(dtype).contiguous()
    return out


class StateDictWeights:
    """A Forge state dict behind the reading interface of FolderWeights (names, shape, dtype, get)."""

    def __init__(self, sd: Mapping):
        self.sd = sd

    def names(self) -> list[str]:
        return list(self.sd)

    def shape(self, name: str) -> tuple:
        return tuple(self.sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.sd[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]


class FolderWeights:
    """The tensors of a Forge model folder (one file or sharded), read one at a time through
    WeightReader. Its files are closed after every read: safetensors memory-maps them, and the
    pages of every tensor read would otherwise stay in this process's resident set."""

    def __init__(self, folder: str):
        from forge.models.sharded import WeightReader
        self.reader = WeightReader(folder)
        self.dtypes = weight_dtypes(folder)

    def names(self) -> list[str]:
        return self.reader.names()

    def shape(self, name: str) -> tuple:
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.reader.get(name)
        finally:
            self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reader.close()


def forge_to_hf_stream(spec: FamilySpec, cfg: ModelConfig, weights, dtype=None, source: str = "model"):
    """The HF tensors of Forge `weights` (FolderWeights or StateDictWeights), rule by rule:
    ([(HF name, shape, dtype)] in the order they come, an iterator of (HF name, tensor)). Names
    and shapes are checked first, before any tensor is read. The iterator reads only the Forge
    tensors the next rule needs, so it holds one rule's inputs and outputs at a time (less the
    outputs already handed out). dtype None keeps each tensor's own dtype. The tied head is
    omitted, as transformers saves it."""
    dtype = None if dtype is None else to_dtype(dtype)
    names = weights.names()
    rules, shapes, hf, _ = plan(spec, cfg, {k: dtype or weights.dtype(k) for k in names})
    missing, unexpected = sorted(set(shapes) - set(names)), sorted(set(names) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {_names(missing)}, unexpected tensors {_names(unexpected)}")
    for k, shape in shapes.items():
        if tuple(weights.shape(k)) != shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(weights.shape(k))}, the config implies {shape}")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t, hk, fk in rules:
            outs = t.to_hf([weights.get(k) if dtype is None else weights.get(k).to(dtype) for k in fk], cfg)
            for k in hk:
                yield k, outs.pop(0).contiguous()      # handed out, no longer held here
    return [(k, *hf[k]) for _, hk, _ in rules for k in hk], tensors()


def forge_to_hf_state_dict(spec: FamilySpec, cfg: ModelConfig, sd: dict, dtype=None,
                           source: str = "model") -> dict[str, torch.Tensor]:
    """HF state dict (tied head omitted, as transformers saves it) from a Forge one."""
    return dict(forge_to_hf_stream(spec, cfg, StateDictWeights(sd), dtype, source)[1])


def _names(keys, n: int = 8) -> str:
    keys = list(keys)
    return str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")


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


def pick_family(cfg: ModelConfig, prefer: str | None = None, strict: bool = True) -> FamilySpec:
    """The HF family to write `cfg` as: `prefer` (error if it cannot represent cfg exactly when
    strict, else ignored), or the first family in FAMILIES that represents it exactly."""
    if prefer:
        if prefer not in FAMILIES:
            raise UnsupportedModelError(f"architecture {prefer!r} is not supported; supported: {sorted(FAMILIES)}")
        errs = representation_errors(FAMILIES[prefer], cfg)
        if not errs:
            return FAMILIES[prefer]
        if strict:
            raise UnsupportedModelError(f"this model cannot be written as {prefer}: " + "; ".join(errs))
    reasons = {}
    for name, spec in FAMILIES.items():
        errs = representation_errors(spec, cfg)
        if not errs:
            return spec
        reasons[name] = errs[0]
    lines = "\n".join(f"  {k}: {v}" for k, v in reasons.items())
    raise UnsupportedModelError(f"no Hugging Face architecture represents this model exactly:\n{lines}")


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


# ---------------------------------------------------------------- writing
def describe_os_error(e: OSError, args) -> str:
    """An OSError outside the writes (a missing or unreadable input), with its file."""
    file = getattr(e, "filename", None)
    return f"{e.strerror}: {file!r}" if file and e.strerror else str(e)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _token_ids(folder: str) -> dict:
    """bos/eos/pad ids known for a Forge folder: hf_source.json, generation_config.json, or the tokenizer."""
    ids = {}
    for name in (HF_SOURCE, "generation_config.json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            d = read_json(p)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if d.get(k) is not None:
                    ids.setdefault(k, d[k])
    tc, tj = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tc) and os.path.isfile(tj):
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(tj)
            with open(tc) as f:
                d = json.load(f)
            for k in ("bos", "eos", "pad"):
                s = d.get(f"{k}_token")
                s = s.get("content") if isinstance(s, dict) else s
                if isinstance(s, str) and tok.token_to_id(s) is not None:
                    ids.setdefault(f"{k}_token_id", tok.token_to_id(s))
        except Exception:                  # noqa: BLE001 - token ids are a nicety, never a failure
            pass
    return ids


def write_forge_folder(out: str, cfg: ModelConfig, sd: dict, tokenizer_dir: str | None = None,
                       hf_source: dict | None = None, force: bool = False) -> None:
    with atomic_dir(out, force) as tmp:
        save_safetensors(sd, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            yaml.safe_dump(model_config_dict(cfg), f, sort_keys=False)
        if tokenizer_dir:
            _copy_tokenizer(tokenizer_dir, tmp)
        if hf_source:
            with open(os.path.join(tmp, HF_SOURCE), "w") as f:
                json.dump(hf_source, f, indent=2)


def hf_config_for(spec: FamilySpec, cfg: ModelConfig, dtype: torch.dtype, token_ids: dict | None = None):
    """The transformers config object for `cfg` written as `spec`."""
    from forge.models.hf.families import hf_config_object
    d = spec.config_to_hf(cfg)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):   # unknown ids: none, not the class defaults
        d[k] = (token_ids or {}).get(k)
    conf = hf_config_object(d, spec.model_type)
    conf.architectures = [spec.architecture]
    conf.dtype = dtype
    return conf


# ---------------------------------------------------------------- streaming safetensors shards
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([KMGT]i?B)?", re.IGNORECASE)
_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def parse_size(size) -> int:
    """Bytes from a size as save_pretrained(max_shard_size=...) takes it: an int or digits (bytes),
    "5GB" / "500MB" / "100KB" (powers of ten: 1GB = 10**9, as transformers) or "2GiB" (powers of two)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.fullmatch(str(size).strip())
        if not m:
            raise ValueError(f"size {size!r} is not a number of bytes or a number with a unit "
                             f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB")
        n = int(float(m[1]) * _UNITS[m[2].upper()]) if m[2] else int(float(m[1]))
    if n <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return n


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def shard_layout(layout: list, max_bytes: int) -> list[list]:
    """[(name, shape, dtype)] in order, cut into shards of at most max_bytes: a shard is closed when
    the next tensor would take it past the limit, and a tensor larger than the limit gets a shard
    of its own (as transformers' save_pretrained, which keeps no order)."""
    shards, current, size = [], [], 0
    for entry in layout:
        n = _nbytes(*entry[1:])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
        if size > max_bytes:               # an oversized tensor, alone
            shards.append(current)
            current, size = [], 0
    return shards + [current] if current else shards


class _SafetensorsFile:
    """One safetensors file written tensor by tensor: the header (each tensor's name, dtype, shape
    and byte range) first, from the declared entries, then each tensor's bytes as it is added, in
    the declared order. Nothing is buffered."""

    def __init__(self, path: str, entries: list, metadata: dict | None = None):
        header, offset = ({"__metadata__": metadata} if metadata else {}), 0
        for name, shape, dtype in entries:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)          # the header is padded to 8 bytes, as safetensors pads it
        self.path, self.todo = path, list(reversed(entries))
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> bool:
        """Append `tensor` (it must be the next declared entry); True once the file is complete."""
        want = self.todo.pop()
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != (want[0], tuple(want[1]), want[2]):
            raise RuntimeError(f"{self.path}: expected tensor {want[0]!r} {tuple(want[1])} {want[2]} next, "
                               f"got {name!r} {got[1]} {got[2]}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self.f.write(flat.view(torch.uint8).numpy())
        if not self.todo:
            self.f.close()
        return not self.todo

    def close(self) -> None:
        self.f.close()


class HFShardWriter:
    """Hugging Face safetensors shards written as tensors arrive, in the order declared by `layout`
    ([(HF name, shape, dtype)]): at most max_bytes each (see shard_layout), named as transformers
    names them (model-00001-of-00003.safetensors, ...) with model.safetensors.index.json, or a
    single model.safetensors (no index) when everything fits in one. One file is open at a time.

        with HFShardWriter(folder, layout, parse_size("5GB")) as w:
            for name, tensor in tensors:
                w.add(name, tensor)
    """

    def __init__(self, folder: str, layout: list, max_bytes: int, metadata: dict | None = None):
        self.folder, self.metadata = folder, {"format": "pt"} if metadata is None else metadata
        self.shards = shard_layout(layout, max_bytes)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.weight_map = {e[0]: f for f, shard in zip(self.files, self.shards) for e in shard}
        self.total_size = sum(_nbytes(*e[1:]) for e in layout)
        self.total_parameters = sum(math.prod(e[1]) for e in layout)
        self.done, self.current = 0, None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.current is None:
            if self.done == len(self.shards):
                raise RuntimeError(f"{self.folder}: tensor {name!r} comes after every declared tensor")
            self.current = _SafetensorsFile(os.path.join(self.folder, self.files[self.done]),
                                            self.shards[self.done], self.metadata)
        if self.current.write(name, tensor):
            self.current, self.done = None, self.done + 1

    def finish(self) -> None:
        """Check every declared tensor was written; write the index when there are several shards."""
        if self.current is not None or self.done != len(self.shards):
            raise RuntimeError(f"{self.folder}: {len(self.shards) - self.done} shard(s) were not completed")
        if len(self.files) > 1:
            index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                     "weight_map": self.weight_map}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.finish()
        elif self.current is not None:
            self.current.close()


def _main_dtype(layout: list) -> torch.dtype:
    """The dtype holding most of the bytes (the config's `dtype` when no single dtype was asked for)."""
    size = Counter()
    for _, shape, dtype in layout:
        size[dtype] += _nbytes(shape, dtype)
    return size.most_common(1)[0][0]


def write_hf_folder(out: str, cfg: ModelConfig, weights, dtype=None, arch: str | None = None,
                    src_dir: str | None = None, force: bool = False,
                    max_shard_size=DEFAULT_MAX_SHARD_SIZE, packed: bool = False) -> FamilySpec:
    """Write Forge weights (a state dict, or FolderWeights to stream a folder) as an HF folder
    loadable by AutoModelForCausalLM.from_pretrained: safetensors shards of at most
    max_shard_size, each HF tensor written as soon as it is made (see forge_to_hf_stream).
    dtype None keeps the dtype each tensor is stored in. packed: BitNet's packed ternary codes and
    weight_scale (forge.models.hf.quantized.pack_bitnet_stream) in place of the projection weights."""
    from transformers import GenerationConfig
    weights = StateDictWeights(weights) if isinstance(weights, Mapping) else weights
    max_bytes = parse_size(max_shard_size)
    prefer, strict, ids = arch, True, {}
    if src_dir:
        ids = _token_ids(src_dir)
        if not arch and os.path.isfile(os.path.join(src_dir, HF_SOURCE)):
            prefer, strict = read_json(os.path.join(src_dir, HF_SOURCE)).get("architecture"), False
    spec = pick_family(cfg, prefer, strict)
    layout, tensors = forge_to_hf_stream(spec, cfg, weights, dtype, source=src_dir or "model")
    conf = hf_config_for(spec, cfg, _main_dtype(layout), ids)
    if packed:
        from forge.models.hf.quantized import BITNET_OFFLINE, pack_bitnet_stream
        layout, tensors = pack_bitnet_stream(layout, tensors, _main_dtype(layout))
        conf.quantization_config = dict(BITNET_OFFLINE)
    with atomic_dir(out, force) as tmp:
        conf.save_pretrained(tmp)
        with HFShardWriter(tmp, layout, max_bytes) as shards:
            for name, tensor in tensors:
                shards.add(name, tensor)
                del tensor                 # not held while the next rule reads its tensors
        if src_dir:
            _copy_tokenizer(src_dir, tmp)
        if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
            GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(tmp)
    return spec


# ---------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="from_", choices=["hf"], help="convert a Hugging Face folder / hub id to Forge")
    way.add_argument("--to", choices=["hf"], help="convert a Forge folder / training run to Hugging Face")
    p.add_argument("--input", required=True, help="source folder (or hub repo id with --from hf)")
    p.add_argument("--output", required=True, help="destination folder (written atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: "
                   "--to hf the dtype the weights are stored in, --from hf fp32)")
    p.add_argument("--max-shard-size", type=_size_arg, help="--to hf: the largest safetensors file to write, "
                   f"e.g. 5GB, 500MB, 100KB (1GB = 10**9 bytes, as transformers) (default {DEFAULT_MAX_SHARD_SIZE}; "
                   "a larger tensor gets a file of its own)")
    p.add_argument("--arch", choices=sorted(FAMILIES), help="--to hf: the HF architecture to write "
                   "(default: the source's, else the first that represents the model exactly)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --output")
    p.add_argument("--quantized", action="store_true", help="--to hf of a model trained with model.quant: write "
                   "the fake-quantised weights q(W) (default: the full-precision W); see forge.models.hf.quantized")
    return p


def _size_arg(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when written; 2 for a bad input (a missing, incomplete or corrupt folder or
    file, named in the message) or an output that cannot be written (nothing is left under
    --output then: the folder is written aside and renamed into place)."""
    from forge.data.tokenizer import check_tokenizer_files
    args = _parser().parse_args(argv)
    try:
        if args.from_ == "hf":
            if args.quantized:
                raise ValueError("--quantized applies to --to hf (a model trained with model.quant)")
            if args.max_shard_size:
                raise ValueError("--max-shard-size applies to --to hf (a Forge folder is one model.safetensors)")
            dtype = DTYPES[args.dtype or "fp32"]
            kind, folder = resolve(args.input)
            if kind != "hf":
                raise ValueError(f"{args.input!r} is a Forge model folder, not a Hugging Face one (use --to hf)")
            check_tokenizer_files(folder)          # before any work: a broken tokenizer is never copied
            cfg, sd, spec, hf_cfg = hf_folder_to_forge(folder, dtype)
            source = {"architecture": spec.architecture}
            gen = os.path.join(folder, "generation_config.json")
            token_src = {}
            if os.path.isfile(gen):
                token_src = read_json(gen)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = hf_cfg.get(k, token_src.get(k))
                if v is not None:
                    source[k] = v
            write_forge_folder(args.output, cfg, sd, folder, source, args.force)
            print(f"wrote Forge model folder {args.output} ({spec.architecture}, {len(sd)} tensors, "
                  f"{args.dtype or 'fp32'})")
        else:
            kind, folder = resolve(args.input)
            if kind != "forge":
                raise ValueError(f"{args.input!r} is a Hugging Face folder, not a Forge one (use --from hf)")
            cfg = read_model_config(folder)
            export_cfg, notes, packed = export_plan(cfg, args.quantized)
            check_tokenizer_files(folder)          # before any work: a broken tokenizer is never copied
            with FolderWeights(folder) as weights:
                source = QuantizedWeights(weights, cfg) if args.quantized and not packed else weights
                spec = write_hf_folder(args.output, export_cfg, source, args.dtype and DTYPES[args.dtype], args.arch,
                                       folder, args.force, args.max_shard_size or DEFAULT_MAX_SHARD_SIZE, packed)
            for note in notes:
                print(f"forge convert: note: {note}")
            files = sorted(n for n in os.listdir(args.output) if n.endswith(".safetensors"))
            print(f"wrote Hugging Face folder {args.output} ({spec.architecture}, {len(files)} safetensors "
                  f"file{'s' if len(files) > 1 else ''}, {args.dtype or 'stored dtype'})")
    except OSError as e:                   # a WriteError says already what and where
        print(f"forge convert: error: {e if isinstance(e, WriteError) else describe_os_error(e, args)}",
              file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"forge convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
