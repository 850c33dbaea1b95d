"""Write a pruned model as a Hugging Face folder plus prunekit.json, atomically.

The folder is written under a temporary name beside the target and renamed when
complete, so a failed or interrupted run never leaves a half-written output.

A model changed by surgery is written in one of two layouts:
- "standard": the model's own transformers class, built from the updated config, has
  exactly the pruned parameter shapes (uniform widths): plain `from_pretrained` loads it.
- "per_layer": anything else (per-layer widths, added biases, families whose attention
  derives head_dim from the head count). The folder gets `modeling_prunekit.py` (a
  subclass of the transformers class that resizes each block) and an `auto_map`, so it
  loads with `prunekit.load_pruned` or `trust_remote_code=True`.
A SliceGPT model ("sliced" layout: `sliced_hidden_size` in its config) gets
`modeling_prunekit_sliced.py` the same way.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.export.shards import write_offloaded
from prunekit.models import pruned_modeling, sliced_modeling
from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.models.compressed import FORMAT, compress_folder
from prunekit.models.loading import LoadedModel
from prunekit.surgery.width import BASE_GEOMETRY_KEY, LAYER_WIDTHS_KEY, head_attributes

RECORD_FILE = "prunekit.json"
MODELING_FILE = "modeling_prunekit.py"
PRUNED_CLASS = "PrunekitForCausalLM"
_PER_LAYER_KEYS = ("prunekit_layers", "prunekit_blocks", "prunekit_base_class", "auto_map")


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def standard_class(model: torch.nn.Module) -> type:
    """The transformers class of `model` (the base class for a reloaded per-layer model)."""
    return getattr(type(model), "prunekit_base", type(model))


def fits_standard_class(model: torch.nn.Module) -> bool:
    """True when the standard class built from `model.config` has exactly `model`'s
    parameter names and shapes."""
    config = copy.deepcopy(model.config)
    for key in (BASE_GEOMETRY_KEY, LAYER_WIDTHS_KEY, *_PER_LAYER_KEYS):
        if hasattr(config, key):
            delattr(config, key)
    try:
        if hasattr(config, "validate"):
            config.validate()
        with torch.device("meta"):
            reference = standard_class(model)(config)
    except Exception:  # e.g. the config rejects a hidden size the head count does not divide
        return False
    return _shapes(reference) == _shapes(model)


def layout_of(model: torch.nn.Module) -> str:
    """ "unchanged" (no surgery), "standard", "per_layer" or "sliced" (module docstring)."""
    if getattr(model.config, "sliced_hidden_size", None) is not None:
        return "sliced"
    if getattr(model.config, BASE_GEOMETRY_KEY, None) is None:
        return "unchanged"
    return "standard" if fits_standard_class(model) else "per_layer"


def per_layer_spec(adapter: ModelAdapter) -> list[dict[str, Any]]:
    """Per block: `{"linears": {path: [out, in, has_bias]}, "attributes": {path: int},
    "factored": {path: [out, rank, in, has_bias]}}` (factored: `LowRankLinear`s)."""
    layers = []
    for block in adapter.blocks:
        linears, factored = {}, {}
        for path, module in adapter.linears(block).items():
            bias = getattr(module, "bias", None) is not None
            if isinstance(module, pruned_modeling.LowRankLinear):
                factored[path] = [module.out_features, module.rank, module.in_features, bias]
            else:
                linears[path] = [*weight_matrix(module).shape, bias]
        attributes = head_attributes(adapter, block) if adapter.spec.heads_removable else {}
        layers.append({"linears": linears, "attributes": attributes, "factored": factored})
    return layers


@contextlib.contextmanager
def _config_for_saving(adapter: ModelAdapter, layout: str) -> Iterator[None]:
    """Temporarily shape `adapter.config` for the chosen layout; restore it afterwards.

    A per-layer folder's config keeps the original widths (what its class is built
    with before resizing each block), so the config validates for every family.
    """
    config = adapter.config
    base = getattr(config, BASE_GEOMETRY_KEY, None) or {}
    keys = (*_PER_LAYER_KEYS, BASE_GEOMETRY_KEY, LAYER_WIDTHS_KEY, *base)
    saved = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    try:
        if layout == "standard":
            for key in (BASE_GEOMETRY_KEY, LAYER_WIDTHS_KEY):
                if hasattr(config, key):
                    delattr(config, key)
        elif layout == "per_layer":
            for key, value in base.items():
                setattr(config, key, value)
            config.prunekit_layers = per_layer_spec(adapter)
            config.prunekit_blocks = adapter.spec.blocks
            config.prunekit_base_class = standard_class(adapter.model).__name__
            config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{PRUNED_CLASS}"}
        yield
    finally:
        for key in keys:
            if hasattr(config, key) and key not in saved:
                delattr(config, key)
        for key, value in saved.items():
            setattr(config, key, value)


def _write_modeling_file(folder: Path, base_class: str) -> None:
    source = inspect.getsource(pruned_modeling)
    line = f'BASE_CLASS_NAME = "{pruned_modeling.BASE_CLASS_NAME}"'
    if line not in source:
        raise RuntimeError("pruned_modeling.py lost its BASE_CLASS_NAME line")
    (folder / MODELING_FILE).write_text(source.replace(line, f'BASE_CLASS_NAME = "{base_class}"'))


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when `out` exists and overwriting was not asked for,
    when it is not a folder, or when its parent cannot be written."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise PrunekitError(f"output folder {out} exists; pass --overwrite to replace it")
    check_writable_parent(out, "the output folder")
    return out


def check_writable_parent(path: Path, what: str) -> None:
    """Fail unless `path` could be created: its nearest existing ancestor is a writable
    folder (`what` names the path in the message)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PrunekitError(f"cannot write {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PrunekitError(f"cannot write {what} {path}: {parent} is not writable")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` / `.NAME.offload-PID` / `.NAME.lock`
    siblings of `out` left by processes that no longer run (killed mid-save)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*"):
        kind, _, rest = path.name[len(out.name) + 2 :].partition("-")
        if kind == "lock":
            pid_text = path.read_text().strip() if path.is_file() else ""
        elif kind in ("tmp", "old", "offload"):
            pid_text = rest.partition("-")[0]
        else:
            continue
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold `.NAME.lock` beside `out` while the finished folder is moved into place, so
    two saves to one folder cannot both succeed."""
    lock = out.with_name(f".{out.name}.lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise PrunekitError(f"another process is writing {out}; try again") from None
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _apply_umask(folder: Path) -> None:
    """Give the folder and its files the modes the user's umask asks for (mkdtemp: 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_pruned(
    lm: LoadedModel,
    out: str | Path,
    record: dict[str, Any],
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    weights: str = "dense",
) -> Path:
    """Save model, tokenizer and `record` to `out`; the folder appears only when complete.
    `extra(folder)` writes further files (e.g. a LoRA adapter) before the folder appears.
    `weights="sparse-bitmask"` stores the pruned linears in compressed-tensors' format.

    Without `overwrite`, a folder that appears at `out` while this one is written wins:
    this save then fails and leaves nothing behind.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    layout = layout_of(lm.model)  # from shapes: blocks streamed from disk are on meta
    try:
        with _config_for_saving(lm.adapter, layout):
            if lm.adapter.offload is not None:
                write_offloaded(lm, tmp)
            else:
                lm.model.save_pretrained(tmp)
        if layout == "per_layer":
            _write_modeling_file(tmp, standard_class(lm.model).__name__)
        elif layout == "sliced":
            shutil.copy(inspect.getsourcefile(sliced_modeling), tmp / sliced_modeling.MODELING_FILE)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        if weights == FORMAT:
            _compress(lm, tmp, record)
        if extra is not None:
            extra(tmp)
        record = {**record, "layout": layout}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        _apply_umask(tmp)
        with _exclusive(out):
            if out.exists() and not overwrite:
                raise PrunekitError(f"output folder {out} appeared while this run wrote it")
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


WEIGHT_FORMATS = ("dense", FORMAT)


def check_weights_format(weights: str, lm: LoadedModel | None = None) -> None:
    """Fail on an unknown weights format, or sparse-bitmask for a streamed model."""
    if weights not in WEIGHT_FORMATS:
        raise PrunekitError(f"unknown weights format {weights!r}; valid: dense, {FORMAT}")
    if weights == FORMAT and lm is not None and lm.adapter.offload is not None:
        raise PrunekitError(f"--weights {FORMAT} is not available with --offload disk")


def _compress(lm: LoadedModel, folder: Path, record: dict[str, Any]) -> None:
    """Compress the saved folder's pruned linears (those holding zeros)."""
    names = {id(m): n for n, m in lm.model.named_modules()}
    targets = set()
    for block in lm.adapter.blocks:
        for module in lm.adapter.linears(block).values():
            if bool((weight_matrix(module) == 0).any()):
                targets.add(names[id(module)])
    pattern = (record.get("request") or {}).get("pattern", "unstructured")
    sparsity = float(record.get("overall_sparsity", 0.0))
    compress_folder(folder, targets, sparsity, pattern)


def read_record(folder: str | Path) -> dict[str, Any]:
    """The prunekit.json of a pruned model folder."""
    return json.loads((Path(folder) / RECORD_FILE).read_text())
