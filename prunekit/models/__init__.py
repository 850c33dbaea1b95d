"""Load: models from folders, hub ids, GGUF files and aliases, and architecture adapters.

Owns `load_model`, `load_pruned`, the `ModelAdapter` that says where a family keeps its
blocks, linears, norms and head (`families.py`), and the small model classes written into
pruned folders (`pruned_modeling.py`, `sliced_modeling.py`). May import only the
cross-cutting root modules (errors, settings, registry, options); never a method.
"""

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
