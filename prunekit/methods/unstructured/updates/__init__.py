"""Weight updates after any mask (`--update NAME`). Every module here registers on import."""

import importlib
import pkgutil

from prunekit.methods.unstructured.updates.base import (
    UPDATES,
    UpdateConfig,
    WeightUpdate,
    get_update,
    reconstruction_error,
    register_update,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "admm_core"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "UPDATES",
    "UpdateConfig",
    "WeightUpdate",
    "get_update",
    "reconstruction_error",
    "register_update",
]
