"""`train.init_from`: start a fresh run (step 0, new optimizer) from pretrained weights.

The source is a Forge model folder (one file or sharded), a checkpoint step dir or run dir (its
newest complete checkpoint), a Hugging Face folder, or a hub id when the network allows.
    1. `resolve_init_from` (before anything is built): the model config becomes the source's; the
       model keys the user wrote (YAML or overrides) are applied on top and refused, naming the key,
       where they change a tensor's shape; the source's tokenizer is used unless data.tokenizer was
       set. A Hugging Face source is converted once, by rank 0, into a Forge folder under
       OUT/init_from (its conversion holds that model's tensors in memory, as `forge convert` does).
    2. `load_init_weights` (after this rank's model is built, before the engine): every rank reads
       only its own boxes of every tensor (forge.layout.weights), under any layout and ZeRO stage.
"""
from __future__ import annotations

import dataclasses
import os

from forge.config import ConfigError, JobConfig

INIT_DIR = "init_from"


def _source(path: str) -> tuple[str, str]:
    from forge.models.hf.convert import resolve
    try:
        return resolve(path)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"train.init_from={path!r}: {e}") from None


def resolve_init_from(cfg: JobConfig, explicit: set[str], rank: int) -> str:
    """Set cfg.model (and data.tokenizer) from the source; returns the Forge folder every rank
    reads its weights from. Collective when the source is a Hugging Face folder (rank 0 converts)."""
    from forge.models.hf.convert import config_from_hf_folder, forge_shapes
    from forge.models.io import read_model_config
    from forge.train import distributed as dist
    kind, folder = _source(cfg.train.init_from)
    source = read_model_config(folder) if kind == "forge" else config_from_hf_folder(folder)[1]
    mine = {k.split(".", 1)[1]: getattr(cfg.model, k.split(".", 1)[1]) for k in explicit
            if k.startswith("model.") and k.count(".") == 1 and k != "model.preset"}
    merged = dataclasses.replace(source, **mine).validate()
    want = forge_shapes(source)
    changed = [k for k in sorted(mine) if forge_shapes(dataclasses.replace(source, **{k: mine[k]})) != want]
    if changed or forge_shapes(merged) != want:
        keys = ", ".join(f"model.{k}={mine[k]!r} (the source has {getattr(source, k)!r})" for k in changed)
        raise ConfigError(f"train.init_from={cfg.train.init_from!r}: {keys or 'the model keys set'} would change the "
                          "shapes of its tensors; leave them unset to take the source's")
    cfg.model = merged
    has_tokenizer = any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))
    if has_tokenizer and "data.tokenizer" not in explicit:
        cfg.data.tokenizer = folder
    if kind == "forge":
        return folder
    out = os.path.join(cfg.train.out_dir, INIT_DIR)
    if rank == 0 and not os.path.isdir(out):
        from forge.models.hf.convert import hf_folder_to_forge, write_forge_folder
        _, sd, spec, _ = hf_folder_to_forge(folder)
        write_forge_folder(out, merged, sd, folder, {"architecture": spec.architecture})
    dist.barrier()
    return out


def load_init_weights(model, cfg: JobConfig, groups, folder: str) -> None:
    """This rank's part of every tensor from the source folder (its boxes only)."""
    from forge.layout.build import forge_name_of
    from forge.layout.weights import load_rank_weights
    try:
        load_rank_weights(model, cfg.model, groups, folder, forge_name_of(model, cfg.model))
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(f"train.init_from={cfg.train.init_from!r}: {e}") from None
