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

This module is the CLI; the work is done in state.py (the state dicts, rule by rule), load.py
(reading HF folders, locating inputs, from_pretrained), save.py (writing Forge and HF folders,
pick_family) and shards.py (streamed safetensors shards). Their names are importable from here.
"""
from __future__ import annotations

import argparse
import os
import sys

from forge.dtypes import DTYPES
from forge.models.hf.families import FAMILIES
from forge.models.hf.load import (_REPO_ID, HF_CONFIG, config_from_hf_folder, download, family_for, from_pretrained,
                                  hf_folder_to_forge, load_hf_state_dict, read_hf_config, read_json, resolve)
from forge.models.hf.quantized import QuantizedWeights, export_plan
from forge.models.hf.save import (HF_SOURCE, TOKENIZER_FILES, hf_config_for, pick_family, write_forge_folder,
                                  write_hf_folder)
from forge.models.hf.shards import DEFAULT_MAX_SHARD_SIZE, HFShardWriter, parse_size, shard_layout
from forge.models.hf.state import (FolderWeights, Plan, StateDictWeights, forge_shapes, forge_to_hf_state_dict,
                                   forge_to_hf_stream, hf_to_forge_state_dict, plan)
from forge.models.io import WriteError, read_model_config

# every name other modules and tests import from here (the code lives in load, save, shards, state)
__all__ = ["_REPO_ID", "DEFAULT_MAX_SHARD_SIZE", "HF_CONFIG", "HF_SOURCE", "TOKENIZER_FILES", "FolderWeights",
           "HFShardWriter", "Plan", "StateDictWeights", "config_from_hf_folder", "describe_os_error", "download",
           "family_for", "forge_shapes", "forge_to_hf_state_dict", "forge_to_hf_stream", "from_pretrained",
           "hf_config_for", "hf_folder_to_forge", "hf_to_forge_state_dict", "load_hf_state_dict", "main",
           "parse_size", "pick_family", "plan", "read_hf_config", "read_json", "resolve", "shard_layout",
           "write_forge_folder", "write_hf_folder"]


def describe_os_error(e: OSError, args) -> str:
    """An OSError outside the writes (a missing or unreadable input), with its file."""
    file = getattr(e, "filename", None)
    return f"{e.strerror}: {file!r}" if file and e.strerror else str(e)


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
