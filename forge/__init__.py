"""Forge: a pretraining framework for decoder-only transformers on PyTorch and DeepSpeed."""
import os

import torch

# DeepSpeed picks its accelerator at import time; on a machine without CUDA tell it to use the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
    """Load a model from a Forge checkpoint folder or a Hugging Face folder / hub repo id."""
    from forge.models.hf.convert import from_pretrained as _load
    return _load(path, **kwargs)
