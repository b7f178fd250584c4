"""Forge <-> Hugging Face state dicts, rule by rule: each rule of a family (a key_map rename or a
Transform of families.py) turns the HF tensors it names into Forge tensors and back. `plan` lists
the active rules for a config with the shapes they imply; every HF tensor must be consumed and
every Forge tensor produced, anything else is an error naming the tensors (and both shapes on a
shape mismatch). `forge_to_hf_stream` reads the Forge tensors one rule at a time."""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch

from forge.config import ModelConfig
from forge.dtypes import to_dtype
from forge.models.hf.families import FamilySpec, Transform, UnsupportedModelError
from forge.models.io import unique_state_dict, weight_dtypes


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
    dtypes in `dtypes`, by Forge name, default float32) and which Forge tensors each HF one feeds.
    The transforms, here and below, read the resolved config (ModelConfig.resolved)."""
    cfg = cfg.resolved()
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
    cfg = cfg.resolved()
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
    cfg = cfg.resolved()
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

