"""The one map from a floating-point dtype's name to a torch dtype.

`DTYPES` holds the short names every `--dtype` flag offers (its choices); `to_dtype` also takes
the long names config files and Hugging Face use ("float32", "bfloat16", "float16") and torch
dtypes themselves.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def to_dtype(d) -> torch.dtype:
    """A torch dtype from a short or long name (or a torch dtype); ValueError lists the names."""
    if isinstance(d, torch.dtype):
        return d
    name = LONG_NAMES.get(d, d)
    if name not in DTYPES:
        raise ValueError(f"dtype {d!r} is not one of {sorted(DTYPES) + sorted(LONG_NAMES)}")
    return DTYPES[name]
