"""Hugging Face <-> Forge conversion, driven by the family specs in `families.py`.

    forge convert --from hf --input HF_DIR|ORG/NAME --output FORGE_DIR [--dtype fp32] [--force]
    forge convert --to hf   --input FORGE_DIR|RUN_DIR --output HF_DIR [--dtype fp32] [--arch X] [--force]
    forge.from_pretrained(path, dtype=torch.float32) -> Transformer   (ids (B, T) -> logits (B, T, V))

`path` may be a Forge model folder (config.yaml + model.safetensors), a training run directory
(the newest `checkpoints/step_*/` holding a COMPLETE marker and a `model/` Forge folder), a
Hugging Face folder (config.json + weights) or a hub repo id (downloaded unless offline).
Every HF tensor must be consumed and every Forge tensor produced; anything else is an error that
names the tensors (and both shapes on a shape mismatch). Outputs are written to a temporary
sibling folder and renamed into place.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from urllib.parse import urlparse

import torch
import yaml
from safetensors.torch import load_file, save_file

from forge.config import ModelConfig
from forge.models.hf.families import FAMILIES, FamilySpec, Transform, UnsupportedModelError, representation_errors
from forge.models.io import (CONFIG_FILE, WEIGHTS_FILE, is_forge_folder, load_model_folder, load_state_dict_strict,
                             read_weights,
                             model_config_dict, read_model_config, unique_state_dict)

HF_CONFIG = "config.json"
HF_SOURCE = "hf_source.json"          # sidecar in a Forge folder converted from HF: architecture + token ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"dtype {d!r} is not one of {sorted(DTYPES)}")
    return DTYPES[d]


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
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in unique_state_dict(model).items()}


def plan(spec: FamilySpec, cfg: ModelConfig):
    """Active rules [(transform, hf_keys, forge_keys)], Forge shapes, the HF shapes they imply and
    which Forge tensors each HF tensor feeds."""
    shapes = forge_shapes(cfg)
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
    hf_shapes, owner = {}, {}
    for t, hk, fk in rules:
        outs = t.to_hf([torch.empty(shapes[k], device="meta") for k in fk], cfg)
        for k, o in zip(hk, outs):
            if k in hf_shapes:
                raise RuntimeError(f"{spec.architecture}: HF tensor {k!r} is consumed by two rules")
            hf_shapes[k], owner[k] = tuple(o.shape), fk
    return rules, shapes, hf_shapes, owner


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
    rules, _, hf_shapes, owner = plan(spec, cfg)
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


def forge_to_hf_state_dict(spec: FamilySpec, cfg: ModelConfig, sd: dict, dtype=None,
                           source: str = "model") -> dict[str, torch.Tensor]:
    """HF state dict (tied head omitted, as transformers saves it) from a Forge one."""
    rules, shapes, _, _ = plan(spec, cfg)
    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {_names(missing)}, unexpected tensors {_names(unexpected)}")
    for k, shape in shapes.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, the config implies {shape}")
    out = {}
    for t, hk, fk in rules:
        for k, o in zip(hk, t.to_hf([sd[k] for k in fk], cfg)):
            out[k] = (o if dtype is None else o.to(dtype)).contiguous()
    return out


def _names(keys, n: int = 8) -> str:
    keys = list(keys)
    return str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")


# ---------------------------------------------------------------- HF folders
def read_hf_config(path: str) -> dict:
    with open(os.path.join(path, HF_CONFIG)) as f:
        return json.load(f)


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
        with open(os.path.join(path, index)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    st = os.path.join(path, "model.safetensors")
    if os.path.isfile(st):
        return load_file(st)
    if os.path.isfile(st + ".index.json"):
        sd = {}
        for name in shards("model.safetensors.index.json"):
            sd.update(load_file(os.path.join(path, name)))
        return sd
    bins = ([os.path.join(path, n) for n in shards("pytorch_model.bin.index.json")]
            if os.path.isfile(os.path.join(path, "pytorch_model.bin.index.json"))
            else [os.path.join(path, "pytorch_model.bin")])
    if not all(os.path.isfile(b) for b in bins):
        raise FileNotFoundError(f"{path!r}: no weights (model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin or pytorch_model.bin.index.json)")
    sd = {}
    for b in bins:
        sd.update(torch.load(b, map_location="cpu", weights_only=True))
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
    spec, cfg, hf_cfg = config_from_hf_folder(path)
    sd = hf_to_forge_state_dict(spec, cfg, load_hf_state_dict(path), _dtype(dtype), source=path)
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
def newest_checkpoint_model(run_dir: str) -> str:
    """`run_dir/checkpoints/step_*/model` of the newest step with a COMPLETE marker (the
    trainer's own checkpoint discovery, forge.train.checkpoint)."""
    from forge.train.checkpoint import MODEL_DIR, checkpoints_dir, list_checkpoints
    for _, d in reversed(list_checkpoints(run_dir)):
        if is_forge_folder(os.path.join(d, MODEL_DIR)):
            return os.path.join(d, MODEL_DIR)
    found = [os.path.basename(d) for _, d in list_checkpoints(run_dir, complete_only=False)]
    raise FileNotFoundError(f"{checkpoints_dir(run_dir)!r} holds no complete checkpoint (a step_* folder with a "
                            f"COMPLETE marker and a model/ folder with {CONFIG_FILE} and {WEIGHTS_FILE}); "
                            f"found {found[-8:] or 'no step dirs'}")


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:                      # noqa: BLE001
        return False


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """A TCP connection to `url`'s host within `timeout` seconds (DNS included, in a thread)."""
    import socket
    u = urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass
    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout)
    return bool(ok)


def download(repo_id: str) -> str:
    """Local snapshot of a hub repo (config, safetensors weights, tokenizer files); a clear error
    at once when offline or the hub is unreachable, never a hang."""
    from huggingface_hub import constants, snapshot_download
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:                      # noqa: BLE001 - not cached: go on to the network
        pass
    if _offline():
        raise ConnectionError(f"{repo_id!r} is not a local folder and is not in the Hugging Face cache, and "
                              f"HF_HUB_OFFLINE is set; download it elsewhere and pass the folder")
    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    if not _reachable(endpoint):
        raise ConnectionError(f"{repo_id!r} is not a local folder and {endpoint} cannot be reached; "
                              f"pass a local Hugging Face folder instead")
    return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)


def resolve(path: str) -> tuple[str, str]:
    """("forge" | "hf", folder) for a Forge folder, run dir, checkpoint dir, HF folder or hub id."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_forge_folder(path):
            return "forge", path
        if os.path.isfile(os.path.join(path, HF_CONFIG)):
            return "hf", path
        if os.path.isdir(os.path.join(path, "checkpoints")):
            return "forge", newest_checkpoint_model(path)
        if is_forge_folder(os.path.join(path, "model")):
            return "forge", os.path.join(path, "model")
        raise FileNotFoundError(f"{path!r} is neither a Forge model folder ({CONFIG_FILE} + {WEIGHTS_FILE}), a "
                                f"training run directory (checkpoints/) nor a Hugging Face folder ({HF_CONFIG})")
    if not os.path.exists(path) and _REPO_ID.fullmatch(path) and not path.startswith((".", "/")):
        return "hf", download(path)
    raise FileNotFoundError(f"{path!r} does not exist (and is not a hub repo id of the form org/name)")


def from_pretrained(path, dtype=torch.float32):
    """A Forge model (eval mode) from any supported folder or hub repo id."""
    from forge.models.transformer import build_model
    dtype = _dtype(dtype)
    kind, folder = resolve(path)
    if kind == "forge":
        return load_model_folder(folder, dtype)[0]
    cfg, sd, _, _ = hf_folder_to_forge(folder, torch.float32)
    model = build_model(cfg, init=False)          # every tensor comes from the folder
    load_state_dict_strict(model, sd, folder)
    return model.to(dtype).eval()


# ---------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_dir(out: str, force: bool = False):
    """Yield a temporary sibling of `out`; on success it replaces `out` (refused when `out` exists
    and is non-empty, unless force)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out!r} exists and is not empty; pass --force to overwrite it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.lexists(out):           # move the old output aside, swap the new one in, then delete
            old = tmp + "-old"
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
            with open(p) as f:
                d = json.load(f)
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
        save_file(sd, os.path.join(tmp, WEIGHTS_FILE))
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


def write_hf_folder(out: str, cfg: ModelConfig, sd: dict, dtype=torch.float32, arch: str | None = None,
                    src_dir: str | None = None, force: bool = False) -> FamilySpec:
    """Write a Forge state dict as an HF folder loadable by AutoModelForCausalLM.from_pretrained."""
    from transformers import GenerationConfig
    dtype = _dtype(dtype)
    prefer, strict, ids = arch, True, {}
    if src_dir:
        ids = _token_ids(src_dir)
        if not arch and os.path.isfile(os.path.join(src_dir, HF_SOURCE)):
            with open(os.path.join(src_dir, HF_SOURCE)) as f:
                prefer, strict = json.load(f).get("architecture"), False
    spec = pick_family(cfg, prefer, strict)
    hf_sd = forge_to_hf_state_dict(spec, cfg, sd, dtype)
    with atomic_dir(out, force) as tmp:
        hf_config_for(spec, cfg, dtype, ids).save_pretrained(tmp)
        save_file(hf_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
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
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights")
    p.add_argument("--arch", choices=sorted(FAMILIES), help="--to hf: the HF architecture to write "
                   "(default: the source's, else the first that represents the model exactly)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dtype = DTYPES[args.dtype]
    try:
        if args.from_ == "hf":
            kind, folder = resolve(args.input)
            if kind != "hf":
                raise ValueError(f"{args.input!r} is a Forge model folder, not a Hugging Face one (use --to hf)")
            cfg, sd, spec, hf_cfg = hf_folder_to_forge(folder, dtype)
            source = {"architecture": spec.architecture}
            gen = os.path.join(folder, "generation_config.json")
            token_src = {}
            if os.path.isfile(gen):
                with open(gen) as f:
                    token_src = json.load(f)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = hf_cfg.get(k, token_src.get(k))
                if v is not None:
                    source[k] = v
            write_forge_folder(args.output, cfg, sd, folder, source, args.force)
            print(f"wrote Forge model folder {args.output} ({spec.architecture}, {len(sd)} tensors, {args.dtype})")
        else:
            kind, folder = resolve(args.input)
            if kind != "forge":
                raise ValueError(f"{args.input!r} is a Hugging Face folder, not a Forge one (use --from hf)")
            cfg = read_model_config(folder)
            sd = read_weights(folder)
            spec = write_hf_folder(args.output, cfg, sd, dtype, args.arch, folder, args.force)
            print(f"wrote Hugging Face folder {args.output} ({spec.architecture}, {args.dtype})")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"forge convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
