"""Data: text sources (offline under `PRUNEKIT_DATA_DIR`, or the hub) and token windows.

Owns calibration and evaluation windows. May import only the cross-cutting root modules.
"""

from prunekit.data.sources import DATASETS, TextSource, check_dataset, load_text
from prunekit.data.windows import (
    PROTOCOLS,
    calibration_windows,
    check_protocol,
    evaluation_windows,
    tokenize,
)

__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "TextSource",
    "calibration_windows",
    "check_protocol",
    "check_dataset",
    "evaluation_windows",
    "load_text",
    "tokenize",
]
