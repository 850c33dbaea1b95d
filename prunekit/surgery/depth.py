"""Depth surgery: remove or merge whole decoder blocks and keep the config consistent.

After `remove_blocks` the model is a smaller standard `transformers` model: the block
list, `num_hidden_layers`, every per-layer config list (`layer_types`, ...), per-layer
overrides of heterogeneous configs, and each attention's `layer_idx` (the KV-cache slot)
all describe the remaining blocks, so `save_pretrained` -> `from_pretrained` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter, set_path


def check_block_indices(indices: Iterable[int], num_blocks: int) -> list[int]:
    """Sorted unique block indices, or a PrunekitError naming the bad ones."""
    chosen = sorted(set(int(i) for i in indices))
    bad = [i for i in chosen if not 0 <= i < num_blocks]
    if bad:
        raise PrunekitError(f"block indices {bad} out of range; valid: 0..{num_blocks - 1}")
    if len(chosen) >= num_blocks:
        raise PrunekitError(f"cannot remove all {num_blocks} blocks; at least one must remain")
    return chosen


def _per_layer_list_keys(config, num_blocks: int) -> list[str]:
    """Config attributes that hold one entry per block (`layer_types`, `no_rope_layers` ...).

    A list is per-layer when its name mentions "layer" and it has one entry per block.
    """
    keys = []
    for key, value in vars(config).items():
        if key.startswith("_") or not isinstance(value, list | tuple):
            continue
        if "layer" in key and len(value) == num_blocks:
            keys.append(key)
    return keys


def _update_config(config, kept: Sequence[int], num_blocks: int) -> None:
    """Rewrite `config` for a model that keeps original blocks `kept` (in order)."""
    lists = {key: getattr(config, key) for key in _per_layer_list_keys(config, num_blocks)}
    spec = getattr(config, "_heterogeneity_spec", None)
    overrides = dict(spec.per_layer_overrides) if spec is not None else None
    config.num_hidden_layers = len(kept)
    for key, values in lists.items():
        setattr(config, key, type(values)(values[i] for i in kept))
    if overrides is not None:
        config.per_layer_config = {
            new: overrides[old] for new, old in enumerate(kept) if old in overrides
        }


def _reindex_block(block: nn.Module, index: int) -> None:
    """Point every `layer_idx` inside `block` (attention's KV-cache slot) at `index`."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def _refresh_model_flags(model: nn.Module) -> None:
    """Model-level flags derived from `layer_types` at construction (e.g. Qwen2's)."""
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is None:
        return
    for module in model.modules():
        if hasattr(module, "has_sliding_layers"):
            module.has_sliding_layers = "sliding_attention" in layer_types


def _check_removable(adapter: ModelAdapter) -> None:
    if getattr(adapter.config, "scale_attn_by_inverse_layer_idx", False):
        raise PrunekitError(
            "this model scales attention by 1/(layer index + 1) "
            "(scale_attn_by_inverse_layer_idx), so its blocks cannot be removed or reordered"
        )


def remove_blocks(adapter: ModelAdapter, indices: Iterable[int]) -> list[int]:
    """Remove blocks `indices` from the model in place; returns the kept original indices."""
    _check_removable(adapter)
    blocks = adapter.blocks
    num_blocks = len(blocks)
    removed = set(check_block_indices(indices, num_blocks))
    kept = [i for i in range(num_blocks) if i not in removed]
    if not removed:
        return kept
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        _reindex_block(block, new_index)
    set_path(adapter.model, adapter.spec.blocks, new_blocks)
    _update_config(adapter.model.config, kept, num_blocks)
    _refresh_model_flags(adapter.model)
    return kept


def mergeable_parameters(adapter: ModelAdapter, block: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a block's linears (weights and biases), `{name: parameter}`."""
    params = {}
    for path, module in adapter.linears(block).items():
        for name, param in module.named_parameters(recurse=False):
            params[f"{path}.{name}"] = param
    return params


@torch.no_grad()
def merge_into(adapter: ModelAdapter, first: int, others: Sequence[int]) -> None:
    """LaCo's parameter merge: θ_first += Σ_j (θ_j − θ_first) over blocks `others`.

    Only the block's linears are merged (their weights and biases); its norms are kept.
    The other blocks are left in place; remove them with `remove_blocks`.
    """
    blocks = adapter.blocks
    target = mergeable_parameters(adapter, blocks[first])
    base = {name: p.detach().clone() for name, p in target.items()}
    for j in others:
        source = mergeable_parameters(adapter, blocks[j])
        for name, param in target.items():
            if source[name].shape != param.shape:
                raise PrunekitError(
                    f"cannot merge block {j} into block {first}: {name} has shape "
                    f"{tuple(source[name].shape)} vs {tuple(param.shape)}"
                )
            param.add_(source[name].to(param.dtype) - base[name])
