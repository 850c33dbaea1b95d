"""Sparse checkpoints in the compressed-tensors `sparse-bitmask` format (the format
llm-compressor writes for sparse models).

A compressed weight `X.weight` [rows, cols] is stored as four tensors:
`X.weight.shape` (int64 [2]), `X.weight.compressed` (its nonzero values in row-major
order, the weight's dtype), `X.weight.bitmask` (uint8 [rows, ceil(cols / 8)], one bit per
weight, little bit order) and `X.weight.row_offsets` (int64 [rows], the index of each
row's first value in `compressed`). config.json gets
`quantization_config = {"quant_method": "compressed-tensors", "format": "dense",
"sparsity_config": {"format": "sparse-bitmask", "global_sparsity", "sparsity_structure",
"targets", "ignore"}, "version"}`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "sparse-bitmask"
FORMAT_VERSION = "0.10.2"  # the compressed-tensors release whose layout this follows
PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four tensors of one weight [rows, cols] (keys: PARTS)."""
    keep = weight != 0
    counts = keep.sum(dim=-1)
    packed = np.packbits(keep.numpy(), axis=-1, bitorder="little")
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[keep].contiguous(),
        "bitmask": torch.from_numpy(packed),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight from its four tensors."""
    shape = [int(v) for v in parts["shape"]]
    bits = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=shape[-1], bitorder="little")
    keep = torch.from_numpy(bits.reshape(shape).astype(bool))
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[keep] = parts["compressed"]
    return dense


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def compress_folder(folder: Path, targets: set[str], sparsity: float, structure: str) -> None:
    """Rewrite the safetensors files of a saved HF folder in place, compressing the
    `targets` (module names whose `.weight` is compressed), and mark config.json."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for file in _weight_files(folder):
        tensors = load_file(str(file))
        out = {}
        for name, tensor in tensors.items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in targets and tensor.dim() == 2:
                for part, value in compress(tensor).items():
                    out[f"{name}.{part}"] = value
                    if index is not None:
                        index["weight_map"][f"{name}.{part}"] = file.name
                if index is not None:
                    del index["weight_map"][name]
            else:
                out[name] = tensor
        save_file(out, str(file), metadata={"format": "pt"})
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "version": FORMAT_VERSION,
        "sparsity_config": {
            "format": FORMAT,
            "global_sparsity": sparsity,
            "sparsity_structure": structure,
            "targets": sorted(targets),
            "ignore": [],
        },
    }
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_compressed_folder(folder: Path) -> bool:
    """True when config.json says the weights are in the sparse-bitmask format."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return False
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    return (quant.get("sparsity_config") or {}).get("format") == FORMAT


def dense_copy(folder: Path) -> Path:
    """A temporary folder holding `folder` with dense weights and no compression config
    (the caller removes it)."""
    target = Path(tempfile.mkdtemp(prefix=".prunekit-dense-"))
    for item in Path(folder).iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy(item, target / item.name)
    index_file = target / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for file in _weight_files(Path(folder)):
        tensors = load_file(str(file))
        dense: dict[str, torch.Tensor] = {}
        for name in [n for n in tensors if n.endswith(".weight.shape")]:
            weight = name.removesuffix(".shape")
            dense[weight] = decompress({p: tensors.pop(f"{weight}.{p}") for p in PARTS})
            if index is not None:
                for p in PARTS:
                    del index["weight_map"][f"{weight}.{p}"]
                index["weight_map"][weight] = file.name
        save_file({**tensors, **dense}, str(target / file.name), metadata={"format": "pt"})
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((target / "config.json").read_text())
    config.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target
