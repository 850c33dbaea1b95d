"""Model classes that prunekit writes into saved folders (loaded with trust_remote_code).

Each module here imports only torch and transformers, so a saved folder works without
prunekit. A model whose `config.auto_map` names `module.Class` gets `module.py` copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PretrainedConfig

REMOTE_DIR = Path(__file__).resolve().parent


def remote_code_files(config: PretrainedConfig) -> list[Path]:
    """The files of this package that `config.auto_map` refers to."""
    auto_map = getattr(config, "auto_map", None) or {}
    modules = {ref.split(".")[0] for ref in auto_map.values() if isinstance(ref, str)}
    return [REMOTE_DIR / f"{m}.py" for m in sorted(modules) if (REMOTE_DIR / f"{m}.py").is_file()]


def copy_remote_code(config: PretrainedConfig, folder: Path) -> None:
    """Copy the model code `config.auto_map` needs into the saved `folder`."""
    for path in remote_code_files(config):
        shutil.copy(path, folder / path.name)
