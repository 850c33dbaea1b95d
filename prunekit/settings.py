"""prunekit's version, where it finds local data and where it keeps its cache."""

from __future__ import annotations

import os
from pathlib import Path

VERSION = "0.1.0"


def data_dir() -> Path | None:
    """`$PRUNEKIT_DATA_DIR`: a folder holding `data/text`, `data/tasks` and `models/`."""
    value = os.environ.get("PRUNEKIT_DATA_DIR")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """`$PRUNEKIT_CACHE_DIR`, else `~/.cache/prunekit`: converted models live here."""
    value = os.environ.get("PRUNEKIT_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "prunekit"
