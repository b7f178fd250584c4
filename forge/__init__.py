"""Forge: a pretraining framework for decoder-only transformers on PyTorch and DeepSpeed."""

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
    """Load a model from a Forge checkpoint folder or a Hugging Face folder / hub repo id."""
    from forge.models.hf.convert import from_pretrained as _load
    return _load(path, **kwargs)
