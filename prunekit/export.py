"""Write a pruned model as a Hugging Face folder plus prunekit.json, atomically.

The folder is written under a temporary name beside the target and renamed when
complete, so a failed or interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models.loading import LoadedModel
from prunekit.remote import copy_remote_code

RECORD_FILE = "prunekit.json"


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when `out` exists and overwriting was not asked for."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise PrunekitError(f"output folder {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder")
    return out


def save_pruned(
    lm: LoadedModel, out: str | Path, record: dict[str, Any], overwrite: bool = False
) -> Path:
    """Save model, tokenizer and `record` to `out`; the folder appears only when complete."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        lm.model.save_pretrained(tmp)
        copy_remote_code(lm.model.config, tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_record(folder: str | Path) -> dict[str, Any]:
    """The prunekit.json of a pruned model folder."""
    return json.loads((Path(folder) / RECORD_FILE).read_text())
