"""prunekit: prune large language models, one block at a time, with one API and one CLI.

The public names below are imported on first use, so `import prunekit` (and the CLI's
`--help`) does not pay for torch and transformers until a model is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prunekit.errors import PrunekitError
from prunekit.settings import VERSION as __version__

if TYPE_CHECKING:
    from prunekit.api import evaluate, load_pruned, prune, save
    from prunekit.models.loading import LoadedModel, load_model
    from prunekit.recovery import heal

_LAZY = {
    "evaluate": "prunekit.api",
    "heal": "prunekit.recovery",
    "load_pruned": "prunekit.api",
    "prune": "prunekit.api",
    "save": "prunekit.api",
    "LoadedModel": "prunekit.models.loading",
    "load_model": "prunekit.models.loading",
}

__all__ = [
    "LoadedModel",
    "PrunekitError",
    "__version__",
    "evaluate",
    "heal",
    "load_model",
    "load_pruned",
    "prune",
    "save",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
