"""Model loading and architecture adapters."""

from prunekit.models.adapter import FamilySpec, ModelAdapter, set_weight_matrix, weight_matrix
from prunekit.models.families import SUPPORTED_MODEL_TYPES, adapter_for
from prunekit.models.loading import ALIASES, LoadedModel, load_model

__all__ = [
    "ALIASES",
    "SUPPORTED_MODEL_TYPES",
    "FamilySpec",
    "LoadedModel",
    "ModelAdapter",
    "adapter_for",
    "load_model",
    "set_weight_matrix",
    "weight_matrix",
]
