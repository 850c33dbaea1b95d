"""Physical removal of attention heads (whole key-value groups) and MLP channels.

Linears are shrunk in place (their weight, bias and feature counts), so hooks, module
types and paths stay as they were. Index conventions, with hd = head_dim and
r = num_heads / num_kv_heads query heads per KV group:

- KV group g holds query heads g·r ... g·r + r − 1 and KV head g; removing it drops
  the rows of q (r·hd), k (hd) and v (hd) and the matching r·hd columns of o.
- MLP channel c is row c of gate and up (fc1) and column c of down (fc2); a fused
  gate_up keeps rows c and I + c.

A KV group is never split: the query heads that share a KV head go with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter, get_path, weight_matrix

# Integer attributes of attention modules that some families read in forward; each is
# set from the block's new geometry when the module has it.
_HEAD_ATTRIBUTES = {
    "num_heads": "heads",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "num_kv_heads": "kv_heads",
    "split_size": "q_width",
}
_INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")
BASE_GEOMETRY_KEY = "prunekit_base_geometry"
LAYER_WIDTHS_KEY = "prunekit_layer_widths"


@dataclass(frozen=True)
class BlockWidths:
    """Widths of one block: query heads, KV heads and MLP intermediate channels."""

    heads: int
    kv_heads: int
    intermediate: int


def shrink_linear(
    module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> None:
    """Keep output rows `rows` and input columns `cols` ([out, in] convention) in place.

    Works for `nn.Linear` and GPT-2's `Conv1D`; the bias follows the rows.
    """
    w = weight_matrix(module)
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    out_features, in_features = w.shape
    requires_grad = module.weight.requires_grad
    stored = w.t() if isinstance(module, Conv1D) else w
    module.weight = nn.Parameter(stored.contiguous(), requires_grad=requires_grad)
    if rows is not None and getattr(module, "bias", None) is not None:
        bias = module.bias.data.index_select(0, rows.to(w.device))
        module.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
    if isinstance(module, Conv1D):
        module.nf = out_features
        module.nx = in_features
    else:
        module.out_features = out_features
        module.in_features = in_features


def _rows(linear: nn.Module) -> int:
    return weight_matrix(linear).shape[0]


def _attention_module(adapter: ModelAdapter, block: nn.Module) -> nn.Module:
    parent = adapter.spec.linears["o"].rpartition(".")[0]
    return get_path(block, parent) if parent else block


def block_widths(adapter: ModelAdapter, block: nn.Module) -> BlockWidths:
    """Current widths of `block`, read from its linears' shapes."""
    roles, hd = adapter.spec.linears, adapter.head_dim
    if "q" in roles:
        heads = _rows(adapter.linear(block, "q")) // hd
        kv_heads = _rows(adapter.linear(block, "k")) // hd
    elif adapter.spec.qkv_layout == "per_head":
        heads = kv_heads = _rows(adapter.linear(block, "qkv")) // (3 * hd)
    else:  # stacked [q | k | v]: q width is o's input width
        heads = weight_matrix(adapter.linear(block, "o")).shape[1] // hd
        kv_heads = (_rows(adapter.linear(block, "qkv")) - heads * hd) // (2 * hd)
    if "gate_up" in roles:
        intermediate = _rows(adapter.linear(block, "gate_up")) // 2
    else:
        intermediate = _rows(adapter.linear(block, "up"))
    return BlockWidths(heads, kv_heads, intermediate)


def check_indices(kind: str, kept: Sequence[int], total: int) -> torch.Tensor:
    """`kept` as a sorted index tensor; one-line error when empty, repeated or out of range."""
    index = torch.as_tensor(list(kept), dtype=torch.long)
    if index.numel() == 0:
        raise PrunekitError(f"cannot remove every {kind} of a block; keep at least one")
    if index.unique().numel() != index.numel() or index.min() < 0 or index.max() >= total:
        raise PrunekitError(f"{kind} indices must be distinct and in [0, {total}), got {kept}")
    return index.sort().values


def _spans(starts: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of consecutive spans: [s, s + width) for each start s."""
    return (starts.unsqueeze(1) * width + torch.arange(width)).flatten()


def head_attributes(adapter: ModelAdapter, block: nn.Module) -> dict[str, int]:
    """The integer attributes of the block's attention that depend on its head counts,
    `{path inside block: value}` (e.g. OPT's `self_attn.num_heads`)."""
    widths = block_widths(adapter, block)
    values = {
        "heads": widths.heads,
        "kv_heads": widths.kv_heads,
        "q_width": widths.heads * adapter.head_dim,
    }
    attention = _attention_module(adapter, block)
    prefix = adapter.spec.linears["o"].rpartition(".")[0]
    found = {}
    for name, what in _HEAD_ATTRIBUTES.items():
        if isinstance(getattr(attention, name, None), int):
            found[f"{prefix}.{name}" if prefix else name] = values[what]
    return found


def keep_heads(adapter: ModelAdapter, block: nn.Module, kv_groups: Sequence[int]) -> None:
    """Keep only the KV groups `kv_groups` of `block` (each with its query heads)."""
    if not adapter.spec.heads_removable:
        raise PrunekitError(
            f"removing attention heads is not supported for {adapter.model_type} (its "
            "attention slices the fused qkv by the config's head counts); MLP channels are"
        )
    widths = block_widths(adapter, block)
    hd, ratio = adapter.head_dim, widths.heads // widths.kv_heads
    groups = check_indices("KV group", kv_groups, widths.kv_heads)
    heads = (groups.unsqueeze(1) * ratio + torch.arange(ratio)).flatten()
    q_rows, kv_rows = _spans(heads, hd), _spans(groups, hd)
    layout = adapter.spec.qkv_layout
    if "q" in adapter.spec.linears:
        shrink_linear(adapter.linear(block, "q"), rows=q_rows)
        shrink_linear(adapter.linear(block, "k"), rows=kv_rows)
        shrink_linear(adapter.linear(block, "v"), rows=kv_rows)
    elif layout == "per_head":
        shrink_linear(adapter.linear(block, "qkv"), rows=_spans(heads, 3 * hd))
    else:
        q_total, kv_total = widths.heads * hd, widths.kv_heads * hd
        rows = torch.cat([q_rows, q_total + kv_rows, q_total + kv_total + kv_rows])
        shrink_linear(adapter.linear(block, "qkv"), rows=rows)
    shrink_linear(adapter.linear(block, "o"), cols=q_rows)
    for path, value in head_attributes(adapter, block).items():
        parent, _, name = path.rpartition(".")
        setattr(get_path(block, parent) if parent else block, name, value)


def keep_channels(adapter: ModelAdapter, block: nn.Module, channels: Sequence[int]) -> None:
    """Keep only the MLP intermediate channels `channels` of `block`."""
    total = block_widths(adapter, block).intermediate
    index = check_indices("MLP channel", channels, total)
    roles = adapter.spec.linears
    if "gate_up" in roles:
        shrink_linear(adapter.linear(block, "gate_up"), rows=torch.cat([index, total + index]))
    else:
        shrink_linear(adapter.linear(block, "up"), rows=index)
        if "gate" in roles:
            shrink_linear(adapter.linear(block, "gate"), rows=index)
    shrink_linear(adapter.linear(block, "down"), cols=index)


def _intermediate_key(config: object) -> str | None:
    for key in _INTERMEDIATE_KEYS:
        if getattr(config, key, None) is not None:
            return key
    return None


def geometry_keys(adapter: ModelAdapter) -> dict[str, str]:
    """Config keys holding the widths: `{"heads" | "kv_heads" | "intermediate": key}`."""
    config = adapter.config
    keys = {"heads": "num_attention_heads"}
    if getattr(config, "num_key_value_heads", None) is not None:
        keys["kv_heads"] = "num_key_value_heads"
    intermediate = _intermediate_key(config)
    if intermediate is not None:
        keys["intermediate"] = intermediate
    return keys


def update_config_widths(adapter: ModelAdapter) -> list[BlockWidths] | None:
    """Make the config describe the blocks' widths after surgery.

    Uniform widths set `num_attention_heads`, `num_key_value_heads` and the intermediate
    size (with `head_dim` made explicit) and return None. Otherwise the config keeps
    its original widths and records `prunekit_layer_widths` (one dict per block); the
    per-layer list is returned. The original widths are kept in
    `prunekit_base_geometry` (set once) either way.
    """
    config = adapter.config
    keys = geometry_keys(adapter)
    head_dim = adapter.head_dim
    if getattr(config, BASE_GEOMETRY_KEY, None) is None:
        base = {key: getattr(config, key) for key in keys.values()}
        setattr(config, BASE_GEOMETRY_KEY, base)
    base = getattr(config, BASE_GEOMETRY_KEY)
    widths = [block_widths(adapter, block) for block in adapter.blocks]
    config.head_dim = head_dim
    if len(set(widths)) == 1:
        for what, key in keys.items():
            setattr(config, key, getattr(widths[0], what))
        if hasattr(config, LAYER_WIDTHS_KEY):
            delattr(config, LAYER_WIDTHS_KEY)
        return None
    for key, value in base.items():
        setattr(config, key, value)
    setattr(config, LAYER_WIDTHS_KEY, [asdict(w) for w in widths])
    return widths


def block_parameters(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def decoder_parameters(adapter: ModelAdapter) -> int:
    """Parameters inside the decoder blocks (what structured sparsity is measured on)."""
    return sum(block_parameters(block) for block in adapter.blocks)


def add_output_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """Add `delta` [out_features] to a linear's bias, creating the bias when it has none."""
    w = weight_matrix(module)
    delta = delta.to(device=w.device, dtype=w.dtype)
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)
    else:
        module.bias.data.add_(delta)
