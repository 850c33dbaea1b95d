"""Pruning methods. Every module in this package registers its methods on import."""

import importlib
import pkgutil

from prunekit.methods.base import (
    REGISTRY,
    LayerwiseMethod,
    Method,
    MethodConfig,
    PruneRequest,
    ScoreMethod,
    get_method,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

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
