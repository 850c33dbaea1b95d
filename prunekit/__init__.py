"""prunekit: prune large language models, one block at a time, with one API and one CLI."""

__version__ = "0.1.0"

from prunekit.api import evaluate, load_pruned, prune, save  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.models.loading import LoadedModel, load_model  # noqa: E402

__all__ = [
    "LoadedModel",
    "PrunekitError",
    "__version__",
    "evaluate",
    "load_model",
    "load_pruned",
    "prune",
    "save",
]
