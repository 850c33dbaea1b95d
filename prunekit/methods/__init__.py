"""Pruning methods, one folder per family; every module registers its methods on import.

- `base.py`: `Method`, `MethodConfig`, `PruneRequest` and the registry.
- `unstructured/`: masks inside weight matrices (unstructured and N:M) and the weight
  updates that re-fit kept weights (`unstructured/updates/`); driver `layerwise.py`.
- `width/`: structured width (heads, KV groups, MLP channels, hidden dimension); driver
  `base.py`.
- `depth/`: whole decoder blocks removed or merged; driver `base.py`.
- `learned/`: hard-concrete masks trained to a target shape (Sheared LLaMA, Compresso,
  NutePrune); driver `base.py`, gates `hard_concrete.py`.
- `search/`: sub-networks of a weight-sharing super-network searched for a Pareto front
  (NAS).
- `lowrank/`: rank-k approximations (LASER).
- `experts/`: mixture-of-experts models: whole experts removed, Wanda and SparseGPT
  inside experts.

Methods may import the engine, surgery, models, data, evaluation and recovery (LoRA);
nothing below this layer imports a method.
"""

import importlib
import pkgutil

from prunekit.methods.base import REGISTRY, Method, MethodConfig, PruneRequest, get_method, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod, ScoreMethod

for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)

__all__ = [
    "REGISTRY",
    "LayerwiseMethod",
    "Method",
    "MethodConfig",
    "PruneRequest",
    "ScoreMethod",
    "get_method",
    "register",
]
