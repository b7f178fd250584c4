"""Sharded Forge weights: every rank writes the tensors it owns, an index says where each lives.

A sharded model folder holds `config.yaml`, `forge_index.json` and one safetensors file per
writing rank (`shard-{rank:05d}.safetensors`). The index maps each Forge tensor name to its
global (tp=1, unpadded, all experts) shape and dtype and to the parts that hold it:

    {"format": "forge-sharded", "version": 1,
     "tensors": {name: {"shape": [..], "dtype": "float32",
                        "parts": [{"file": F, "key": K, "start": [..], "shape": [..]}  # a box
                                  | {..., "flat": [a, b]}]}}}                          # part of one
A part is the box of the global tensor that starts at `start` with extent `shape` (a tp shard:
offset along its partition dim; an expert slice: offset along dim 0; both at once for
tp-sharded experts). With "flat": [a, b] the stored 1-D tensor holds elements a..b-1 of the
row-major flattening of that box (a ZeRO 3 partition of the rank's tp shard).

`WeightReader` reads a single-file folder (`model.safetensors`) or a sharded one tensor by
tensor, or any box of a tensor, opening only the parts that overlap it (safetensors slices), so
no reader ever holds more than the tensor it asked for.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from forge.fsutil import save_safetensors

INDEX_FILE = "forge_index.json"
FORMAT = "forge-sharded"


class WeightFileError(ValueError):
    """A weight file (safetensors) or index that is missing, truncated or corrupt; the message
    names the file and what to do."""


REDO = ("re-create it (copy or convert it again; for a training checkpoint, resume from an earlier "
        "complete step)")


def open_safetensors(file: str):
    """An open `safe_open` handle on `file` (entered; close with __exit__), or WeightFileError
    naming the file: safetensors checks at open that the header parses and that its tensors
    cover the file exactly, so a truncated file is caught here, before any tensor is read."""
    try:
        f = safe_open(file, framework="pt")
        return f.__enter__()
    except FileNotFoundError:
        raise WeightFileError(f"weight file {file!r} is missing; {REDO}") from None
    except Exception as e:          # noqa: BLE001 - SafetensorError is a plain Exception
        raise WeightFileError(f"weight file {file!r} is not a readable safetensors file ({e}): it is truncated "
                              f"or corrupt; {REDO}") from None


def read_index(folder: str) -> dict:
    """The parsed forge_index.json of a sharded folder, or WeightFileError naming it."""
    path = os.path.join(folder, INDEX_FILE)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(f"{path}: not a readable Forge index ({e}); {REDO}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("tensors"), dict):
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise WeightFileError(f"{path}: format {got!r} is not {FORMAT!r} with a 'tensors' map; {REDO}")
    return index


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Part:
    """One stored piece of a global tensor (see the module docstring)."""
    name: str                       # Forge name of the global tensor
    tensor: torch.Tensor            # the stored values (the box, or its flat range)
    global_shape: tuple
    start: tuple                    # offset of the box in the global tensor
    box: tuple                      # extent of the box
    flat: tuple | None = None       # (a, b): elements of the flattened box held by `tensor`


def write_parts(folder: str, rank: int, parts: list[Part]) -> dict:
    """Write this rank's parts to `folder/shard-{rank}.safetensors`; returns its index entries
    (merged over ranks by `merge_index`). Writes even when `parts` is empty (no file then)."""
    entries: dict = {}
    if not parts:
        return entries
    file = shard_file(rank)
    tensors = {}
    for i, p in enumerate(parts):
        key = p.name if p.name not in tensors else f"{p.name}#{i}"
        tensors[key] = p.tensor.detach().to("cpu").contiguous()
        part = {"file": file, "key": key, "start": list(p.start), "shape": list(p.box)}
        if p.flat is not None:
            part["flat"] = list(p.flat)
        entry = entries.setdefault(p.name, {"shape": list(p.global_shape), "dtype": _dtype_name(p.tensor.dtype),
                                            "parts": []})
        entry["parts"].append(part)
    from forge.models.io import writing
    with writing(os.path.join(folder, file)):           # a full disk names this file
        save_safetensors(tensors, os.path.join(folder, file))
    return entries


def merge_index(per_rank: list[dict]) -> dict:
    """The index of a checkpoint from every rank's `write_parts` entries; checks that each
    tensor's parts agree on its shape and dtype and cover it exactly once."""
    tensors: dict = {}
    for entries in per_rank:
        for name, e in entries.items():
            t = tensors.setdefault(name, {"shape": e["shape"], "dtype": e["dtype"], "parts": []})
            if t["shape"] != e["shape"] or t["dtype"] != e["dtype"]:
                raise ValueError(f"tensor {name!r}: ranks disagree on its shape/dtype "
                                 f"({t['shape']}, {t['dtype']}) vs ({e['shape']}, {e['dtype']})")
            t["parts"].extend(e["parts"])
    for name, t in tensors.items():
        total = 1
        for n in t["shape"]:
            total *= n
        covered = sum(_part_numel(p) for p in t["parts"])
        if covered != total:
            raise ValueError(f"tensor {name!r} of shape {t['shape']}: the ranks' parts hold {covered} "
                             f"elements, not {total} (a shard missing or written twice)")
    return {"format": FORMAT, "version": 1, "tensors": dict(sorted(tensors.items()))}


def _part_numel(p: dict) -> int:
    if "flat" in p:
        return p["flat"][1] - p["flat"][0]
    n = 1
    for s in p["shape"]:
        n *= s
    return n


def write_index(folder: str, index: dict) -> None:
    from forge.fsutil import write_json_atomic
    from forge.models.io import writing
    with writing(os.path.join(folder, INDEX_FILE)):
        write_json_atomic(os.path.join(folder, INDEX_FILE), index, durable=False)


def is_sharded_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_FILE))


# ---------------------------------------------------------------- reading
@dataclass
class WeightReader:
    """Tensors of a Forge model folder (single file or sharded), read one at a time.

        with WeightReader(folder) as r:
            r.names(); r.shape(name); r.get(name); r.get_box(name, start, shape)
    """
    folder: str
    _index: dict = field(default_factory=dict)
    _files: dict = field(default_factory=dict)

    def __post_init__(self):
        from forge.models.io import WEIGHTS_FILE
        if is_sharded_folder(self.folder):
            self._index = read_index(self.folder)["tensors"]
            return
        single = os.path.join(self.folder, WEIGHTS_FILE)
        if not os.path.isfile(single):
            raise FileNotFoundError(f"{self.folder!r} holds neither {INDEX_FILE} nor {WEIGHTS_FILE}")
        f = self._open(WEIGHTS_FILE)
        for key in f.keys():
            shape = list(f.get_slice(key).get_shape())
            self._index[key] = {"shape": shape, "dtype": None,
                                "parts": [{"file": WEIGHTS_FILE, "key": key, "start": [0] * len(shape),
                                           "shape": shape}]}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()

    def _open(self, file):
        if file not in self._files:
            self._files[file] = open_safetensors(os.path.join(self.folder, file))
        return self._files[file]

    def names(self) -> list[str]:
        return list(self._index)

    def shape(self, name: str) -> tuple:
        return tuple(self._entry(name)["shape"])

    def _entry(self, name):
        if name not in self._index:
            raise KeyError(f"tensor {name!r} is not in {self.folder!r}")
        return self._index[name]

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.get_box(name, (0,) * len(shape), shape)

    def get_box(self, name: str, start, shape) -> torch.Tensor:
        """The box [start, start + shape) of global tensor `name`, read from the parts that overlap it."""
        entry = self._entry(name)
        start, shape = tuple(start), tuple(shape)
        for part in entry["parts"]:            # one stored box is exactly the region: read it as it is
            if "flat" not in part and tuple(part["start"]) == start and tuple(part["shape"]) == shape:
                return self._read(part, [0] * len(shape), list(shape))[0]
        out, filled = None, 0
        for part in entry["parts"]:
            lo = [max(a, b) for a, b in zip(start, part["start"])]
            hi = [min(a + n, b + m) for a, n, b, m in zip(start, shape, part["start"], part["shape"])]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            piece, covered = self._read(part, [l - p for l, p in zip(lo, part["start"])], [h - l for l, h in zip(lo, hi)])
            if out is None:
                out = torch.zeros(shape, dtype=piece.dtype)
            out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] += piece   # parts are disjoint
            filled += covered
        total = 1
        for n in shape:
            total *= n
        if out is None or filled != total:
            raise ValueError(f"{self.folder!r}: the parts of {name!r} cover {filled} of the {total} elements "
                             f"of box start={list(start)} shape={list(shape)}")
        return out

    def _read(self, part, lo, size) -> tuple[torch.Tensor, int]:
        """Elements [lo, lo + size) (relative to the part's box) of one part, zero where the part
        holds nothing, and how many it holds."""
        f = self._open(part["file"])
        region = tuple(slice(a, a + n) for a, n in zip(lo, size))
        try:
            stored = f.get_slice(part["key"])
        except Exception as e:          # noqa: BLE001 - SafetensorError: the index names a key the file lacks
            raise WeightFileError(f"weight file {os.path.join(self.folder, part['file'])!r} has no tensor "
                                  f"{part['key']!r} that {INDEX_FILE} names ({e}); {REDO}") from None
        if "flat" not in part:
            piece = stored[region] if size else stored[:]
            return piece, piece.numel()
        # a flat range of the box (a ZeRO 3 partition): place it in the box, then cut the region
        a, b = part["flat"]
        flat = stored[:]
        box = torch.zeros(part["shape"], dtype=flat.dtype)
        held = torch.zeros(part["shape"], dtype=torch.bool)
        box.view(-1)[a:b] = flat
        held.view(-1)[a:b] = True
        return box[region].clone(), int(held[region].sum())
