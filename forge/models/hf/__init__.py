"""Hugging Face conversion: family specs (`families.FAMILIES`) and the converter (`convert`)."""
from forge.models.hf.families import FAMILIES, FamilySpec, Transform, UnsupportedModelError  # noqa: F401
