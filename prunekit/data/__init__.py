"""Text sources and token windows."""

from prunekit.data.sources import DATASETS, TextSource, check_dataset, load_text
from prunekit.data.windows import calibration_windows, evaluation_windows, tokenize

__all__ = [
    "DATASETS",
    "TextSource",
    "calibration_windows",
    "check_dataset",
    "evaluation_windows",
    "load_text",
    "tokenize",
]
