"""One configurable decoder; components come from plain-dict registries keyed in ModelConfig."""
from forge.models.transformer import Transformer, build_model  # noqa: F401
