"""A causal LM whose decoder blocks each have their own widths (heads, MLP channels, biases).

prunekit copies this file into a pruned model folder as `modeling_prunekit.py` and points
the config's `auto_map` at `PrunekitForCausalLM`, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the model offline with only torch and transformers installed. The class extends the
transformers class named by `BASE_CLASS_NAME`: it is built with the original widths
(`prunekit_base_geometry` in the config), then every block's linears are resized to the
shapes in `prunekit_layers` (`{"linears": {path: [out, in, has_bias]}, "attributes":
{path: int}, "factored": {path: [out, rank, in, has_bias]}}` per block; a factored linear
becomes a `LowRankLinear`) before the checkpoint's weights are loaded into them.
"""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

BASE_CLASS_NAME = "LlamaForCausalLM"  # rewritten when the file is written into a folder


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, value: object) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


def base_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """A copy of `config` with the widths the unpruned model was built with."""
    base = copy.deepcopy(config)
    for key, value in (getattr(config, "prunekit_base_geometry", None) or {}).items():
        setattr(base, key, value)
    return base


def resize_linear(module: nn.Module, out_features: int, in_features: int, bias: bool) -> None:
    """Give a linear (or GPT-2 Conv1D) new, uninitialised parameters of the given shape."""
    like = module.weight
    conv = isinstance(module, Conv1D)
    shape = (in_features, out_features) if conv else (out_features, in_features)
    module.weight = nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device))
    module.bias = (
        nn.Parameter(torch.zeros(out_features, dtype=like.dtype, device=like.device))
        if bias
        else None
    )
    if conv:
        module.nf, module.nx = out_features, in_features
    else:
        module.out_features, module.in_features = out_features, in_features


class LowRankLinear(nn.Module):
    """A linear stored as two factors: y = outer(inner(x)), inner [rank, in] without bias,
    outer [out, rank] with the original bias. `weight` is their product [out, in]."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, like=None):
        super().__init__()
        kwargs = {"dtype": like.dtype, "device": like.device} if like is not None else {}
        self.inner = nn.Linear(in_features, rank, bias=False, **kwargs)
        self.outer = nn.Linear(rank, out_features, bias=bias, **kwargs)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    @property
    def weight(self) -> torch.Tensor:
        return self.outer.weight @ self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.outer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(x))


def resize_blocks(model: nn.Module, config: transformers.PretrainedConfig) -> None:
    """Resize every block's linears and attention attributes as `config` records."""
    blocks = _get(model, config.prunekit_blocks)
    for block, layer in zip(blocks, config.prunekit_layers, strict=True):
        for path, (out_features, in_features, bias) in layer["linears"].items():
            resize_linear(_get(block, path), out_features, in_features, bias)
        for path, (out_features, rank, in_features, bias) in layer.get("factored", {}).items():
            like = _get(block, path).weight
            _set(block, path, LowRankLinear(in_features, out_features, rank, bias, like))
        for path, value in layer["attributes"].items():
            _set(block, path, value)


def _share_weight_renames(base: type, cls: type) -> None:
    """Give `cls` the checkpoint key renames transformers keeps for `base` (e.g. GPT-NeoX
    saves `lm_head` as `embed_out`); custom classes do not inherit them."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers: no conversion mappings
        return
    mapping = get_checkpoint_conversion_mapping(base.__name__)
    if mapping:
        register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


def pruned_class(base: type) -> type:
    """A subclass of the transformers class `base` that builds per-block widths."""

    def __init__(self, config: transformers.PretrainedConfig, *args, **kwargs) -> None:
        base.__init__(self, base_config(config), *args, **kwargs)
        resize_blocks(self, config)

    name = f"Prunekit{base.__name__}"
    cls = type(name, (base,), {"__init__": __init__, "prunekit_base": base})
    _share_weight_renames(base, cls)
    return cls


PrunekitForCausalLM = pruned_class(getattr(transformers, BASE_CLASS_NAME))
