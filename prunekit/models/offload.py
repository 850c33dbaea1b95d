"""Blocks kept on disk: a model larger than memory, pruned one block at a time.

`load_offloaded` builds the model with its embedding, final norm and head in memory and
every decoder block on the meta device (shapes only). `DiskBlocks` then gives the engine
one block at a time: `load(i)` reads block i's tensors from the checkpoint's safetensors
shards (or from the staging folder once the block was pruned), `unload(i, keep)` writes
the block to the staging folder when `keep` (the pass that prunes it) and puts it back on
the meta device. Peak memory is the embedding and head, one block, and the activations.
The export layer turns the staging folder into a sharded HF folder.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter, get_path, weight_matrix
from prunekit.models.families import adapter_for

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """`{tensor name: safetensors file}` of a HF folder (single file or sharded)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise PrunekitError(
        f"--offload disk reads safetensors shards; {folder} has none (model.safetensors "
        "or model.safetensors.index.json); convert it with save_pretrained first"
    )


def file_bytes(files: dict[str, Path]) -> int:
    return sum(p.stat().st_size for p in set(files.values()))


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, read shard by shard."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
    return out


class DiskBlocks:
    """Decoder blocks on disk: read when the engine reaches them, staged when pruned.

    `staging` receives `block-{i:05d}.safetensors` for every block unloaded with
    `keep=True`; `counts` holds each staged linear's (zeros, weights) for the record.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        files: dict[str, Path],
        staging: Path,
        buffers: dict[str, torch.Tensor],
    ):
        self.adapter = adapter
        self.files = files
        self.staging = staging
        self.buffers = buffers  # a block's non-persistent buffers (the same in every block)
        self.prefix = adapter.spec.blocks + "."
        self.counts: dict[int, dict[str, tuple[int, int]]] = {}
        # a folder for file-backed activations when they do not fit the memory budget
        self.activations: Path | None = None
        staging.mkdir(parents=True, exist_ok=True)

    def staged(self, index: int) -> Path:
        return self.staging / f"block-{index:05d}.safetensors"

    def names(self, index: int) -> list[str]:
        """Full state-dict names of block `index`'s tensors."""
        block = self.adapter.blocks[index]
        return [f"{self.prefix}{index}.{k}" for k in block.state_dict()]

    def block_bytes(self, index: int) -> int:
        block = self.adapter.blocks[index]
        return sum(t.numel() * t.element_size() for t in block.state_dict().values())

    def load(self, index: int) -> None:
        """Materialise block `index` on the CPU from its staged file or the checkpoint."""
        block = self.adapter.blocks[index]
        if not _on_meta(block):
            return
        names = self.names(index)
        staged = self.staged(index)
        files = dict.fromkeys(names, staged) if staged.is_file() else self.files
        missing = [n for n in names if n not in files]
        if missing:
            raise PrunekitError(f"the checkpoint has no tensor {missing[0]}")
        tensors = read_tensors(files, names)
        block.to_empty(device="cpu")
        local = {name[len(f"{self.prefix}{index}.") :]: t for name, t in tensors.items()}
        with torch.no_grad():
            for key, value in block.state_dict(keep_vars=True).items():
                value.copy_(local[key].to(value.dtype))
            for key, value in block.named_buffers():
                if key in self.buffers:
                    value.copy_(self.buffers[key])

    def unload(self, index: int, keep: bool) -> None:
        """Free block `index`; with `keep`, first write it to the staging folder."""
        block = self.adapter.blocks[index]
        if _on_meta(block):
            return
        if keep:
            self._stage(index, block.state_dict())
            self.counts[index] = {
                path: _zeros(weight_matrix(m)) for path, m in self.adapter.linears(block).items()
            }
        block.to("meta")

    def _stage(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Write block `index`'s `state` (names inside the block) to its staged file."""
        named = {f"{self.prefix}{index}.{k}": v.detach().contiguous() for k, v in state.items()}
        tmp = self.staged(index).with_suffix(".tmp")
        save_file(named, str(tmp))
        tmp.replace(self.staged(index))

    def renumber(self, kept: list[int]) -> None:
        """After depth surgery: block j of the model is original block `kept[j]`. Stage
        each under its new index, tensor names renamed, read from its staged file or the
        checkpoint one block at a time; drop the staged files past the new depth."""
        for new, old in enumerate(kept):
            keys = list(self.adapter.blocks[new].state_dict())
            names = [f"{self.prefix}{old}.{k}" for k in keys]
            staged = self.staged(old)
            files = dict.fromkeys(names, staged) if staged.is_file() else self.files
            tensors = read_tensors(files, names)
            state = {k: tensors[n] for k, n in zip(keys, names, strict=True)}
            self._stage(new, state)
            paths = self.adapter.linears(self.adapter.blocks[new])
            self.counts[new] = {p: _zeros(state[f"{p}.weight"]) for p in paths}
        for index in range(len(kept), max(kept, default=-1) + 1):
            self.staged(index).unlink(missing_ok=True)
            self.counts.pop(index, None)

    def missing(self) -> list[int]:
        """Blocks never staged (not pruned yet)."""
        return [i for i in range(len(self.adapter.blocks)) if not self.staged(i).is_file()]


@contextmanager
def block_in_memory(adapter: ModelAdapter, index: int, keep: bool) -> Iterator[None]:
    """Block `index` in memory for the `with` body when the model streams from disk
    (`adapter.offload`), then freed; with `keep`, written (changed) to the staging folder
    first. Nothing happens for a model in memory."""
    offload = adapter.offload
    if offload is not None:
        offload.load(index)
    try:
        yield
    except BaseException:
        if offload is not None:  # a failed step stages nothing
            offload.unload(index, keep=False)
        raise
    if offload is not None:
        offload.unload(index, keep=keep)


def _zeros(weight: torch.Tensor) -> tuple[int, int]:
    """(zero entries, entries) of a weight."""
    return int((weight == 0).sum()), weight.numel()


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict().values())


def load_offloaded(
    folder: Path, dtype: torch.dtype, staging: Path
) -> tuple[nn.Module, ModelAdapter]:
    """The model of HF folder `folder` with its blocks on the meta device, and its adapter
    whose `offload` streams them from disk."""
    files = checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder)
    depth = config.num_hidden_layers
    skeleton = copy.deepcopy(config)
    skeleton.num_hidden_layers = 1
    if getattr(skeleton, "layer_types", None):
        skeleton.layer_types = skeleton.layer_types[:1]
    model = AutoModelForCausalLM.from_config(skeleton, dtype=dtype)  # real head, one block
    blocks_path = adapter_for(model).spec.blocks
    template = get_path(model, blocks_path)[0]
    persistent = set(template.state_dict())
    buffers = {n: b for n, b in template.named_buffers() if n not in persistent}
    skeleton.num_hidden_layers = depth
    if getattr(config, "layer_types", None):
        skeleton.layer_types = config.layer_types
    with torch.device("meta"):
        layers = [type(template)(skeleton, i).to(dtype) for i in range(depth)]
    parent, _, name = blocks_path.rpartition(".")
    setattr(get_path(model, parent), name, nn.ModuleList(layers))
    prefix = blocks_path + "."
    rest = [n for n in files if not n.startswith(prefix)]
    state = {k: v.to(dtype) for k, v in read_tensors(files, rest).items()}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(prefix)]
    tied = getattr(config, "tie_word_embeddings", False)
    if missing and not (tied and all(k.startswith("lm_head.") for k in missing)):
        raise PrunekitError(f"the checkpoint in {folder} has no tensor {missing[0]}")
    model.eval()
    adapter = adapter_for(model)
    adapter.offload = DiskBlocks(adapter, files, staging, buffers)
    return model, adapter
