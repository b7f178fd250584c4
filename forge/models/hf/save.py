"""Writing folders: a Forge model folder from a converted HF one (with its tokenizer and an
hf_source.json sidecar), and an HF folder from Forge weights, streamed rule by rule into
safetensors shards (see shards.py); `pick_family` chooses the HF architecture to write."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import torch
import yaml

from forge.config import ModelConfig
from forge.fsutil import save_safetensors
from forge.models.hf.families import FAMILIES, FamilySpec, UnsupportedModelError, representation_errors
from forge.models.hf.load import read_json
from forge.models.hf.shards import DEFAULT_MAX_SHARD_SIZE, HFShardWriter, _main_dtype, parse_size
from forge.models.hf.state import StateDictWeights, forge_to_hf_stream
from forge.models.io import CONFIG_FILE, WEIGHTS_FILE, atomic_dir, model_config_dict

HF_SOURCE = "hf_source.json"          # sidecar in a Forge folder converted from HF: architecture + token ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


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
    d = spec.config_to_hf(cfg.resolved())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):   # unknown ids: none, not the class defaults
        d[k] = (token_ids or {}).get(k)
    conf = hf_config_object(d, spec.model_type)
    conf.architectures = [spec.architecture]
    conf.dtype = dtype
    return conf


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
