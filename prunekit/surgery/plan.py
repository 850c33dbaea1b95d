"""Structures of a block (KV groups, MLP channels), their parameter costs, and plans that
say how many of each to remove so a parameter budget is met.

A structure's score comes from per-weight values summed over its slices of each linear:
`structure_sums` maps a per-linear value matrix [out, in] to one number per KV group (for
attention linears) or per MLP channel (for MLP linears).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.surgery.residual import OUTPUTS
from prunekit.surgery.width import block_widths

ATTENTION = ("q", "k", "v", "qkv", "o")
Number = float | torch.Tensor
MLP = ("gate", "up", "gate_up", "down")


@dataclass(frozen=True)
class StructureIds:
    """Which structure each row (axis 0) or column (axis 1) of a linear belongs to."""

    axis: int
    ids: torch.Tensor  # [rows or cols], long: KV group or MLP channel index


def structure_ids(adapter: ModelAdapter, block: nn.Module) -> dict[str, StructureIds]:
    """`{role: StructureIds}` for every linear of the block (layout as in surgery)."""
    w = block_widths(adapter, block)
    hd, ratio = adapter.head_dim, w.heads // w.kv_heads
    q_groups = torch.arange(w.heads * hd) // hd // ratio
    kv_groups = torch.arange(w.kv_heads * hd) // hd
    channels = torch.arange(w.intermediate)
    ids = {}
    for role in adapter.spec.linears:
        if role == "q":
            ids[role] = StructureIds(0, q_groups)
        elif role in ("k", "v"):
            ids[role] = StructureIds(0, kv_groups)
        elif role == "o":
            ids[role] = StructureIds(1, q_groups)
        elif role == "qkv" and adapter.spec.qkv_layout == "per_head":
            ids[role] = StructureIds(0, torch.arange(w.heads * 3 * hd) // (3 * hd))
        elif role == "qkv":
            ids[role] = StructureIds(0, torch.cat([q_groups, kv_groups, kv_groups]))
        elif role in ("gate", "up"):
            ids[role] = StructureIds(0, channels)
        elif role == "gate_up":
            ids[role] = StructureIds(0, torch.cat([channels, channels]))
        elif role == "down":
            ids[role] = StructureIds(1, channels)
    return ids


def structure_sums(
    adapter: ModelAdapter, block: nn.Module, values: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per role, `values[role]` [out, in] summed over each structure's slice.

    Attention roles give [kv_heads] (per KV group), MLP roles [intermediate] (per channel).
    """
    w = block_widths(adapter, block)
    out = {}
    for role, where in structure_ids(adapter, block).items():
        if role not in values:
            continue
        size = w.kv_heads if role in ATTENTION else w.intermediate
        per_line = values[role].float().sum(1 - where.axis)
        total = torch.zeros(size, dtype=per_line.dtype, device=per_line.device)
        out[role] = total.index_add_(0, where.ids.to(per_line.device), per_line)
    return out


def channel_lines(
    adapter: ModelAdapter, block: nn.Module, lines: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per role, one value per row / column `lines[role]` [rows or cols] placed by
    structure and channel: attention roles give [kv_heads, head_dim] (the query heads of
    a KV group, and q / k / v of a fused qkv, summed onto the group's head_dim channels),
    MLP roles [intermediate, 1] (fused gate and up summed)."""
    w = block_widths(adapter, block)
    out = {}
    for role, where in structure_ids(adapter, block).items():
        if role not in lines:
            continue
        attention = role in ATTENTION
        size, width = (w.kv_heads, adapter.head_dim) if attention else (w.intermediate, 1)
        ids = where.ids.to(lines[role].device)
        order = torch.argsort(ids, stable=True)  # lines grouped by structure, in order
        counts = torch.bincount(ids, minlength=size)
        first = torch.cumsum(counts, 0) - counts
        channel = torch.empty_like(ids)  # the line's rank among its structure's lines
        channel[order] = torch.arange(ids.numel(), device=ids.device) - first[ids[order]]
        flat = torch.zeros(size * width, dtype=lines[role].dtype, device=ids.device)
        flat.index_add_(0, ids * width + channel % width, lines[role])
        out[role] = flat.view(size, width)
    return out


def linear_values(adapter: ModelAdapter, block: nn.Module, fn) -> dict[str, torch.Tensor]:
    """`{role: fn(role, module, weight [out, in] float)}` over the block's linears."""
    return {
        role: fn(role, adapter.linear(block, role), weight_matrix(adapter.linear(block, role)))
        for role in adapter.spec.linears
    }


def combine(per_role: dict[str, torch.Tensor], roles: tuple[str, ...], how: str = "sum"):
    """Aggregate per-role structure scores over the roles present: sum, max, prod, last."""
    stack = torch.stack([per_role[r] for r in roles if r in per_role])
    if how == "sum":
        return stack.sum(0)
    if how == "max":
        return stack.max(0).values
    if how == "prod":
        return stack.prod(0)
    if how == "last":
        return stack[-1]
    raise ValueError(how)


@dataclass(frozen=True)
class BlockCosts:
    """Parameters removed with one KV group and with one MLP channel of a block."""

    group: int
    channel: int


def block_costs(adapter: ModelAdapter, block: nn.Module) -> BlockCosts:
    """Parameter count of KV group 0 and of MLP channel 0 (weights and row biases)."""
    costs = {"group": 0, "channel": 0}
    for role, where in structure_ids(adapter, block).items():
        module = adapter.linear(block, role)
        other = weight_matrix(module).shape[1 - where.axis]
        lines = int((where.ids == 0).sum())
        bias = lines if where.axis == 0 and getattr(module, "bias", None) is not None else 0
        costs["group" if role in ATTENTION else "channel"] += lines * other + bias
    return BlockCosts(**costs)


@dataclass
class BlockPlan:
    """Kept KV groups and MLP channels of one block (sorted indices)."""

    groups: list[int]
    channels: list[int]


def keep_top(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices of all but the `remove` lowest scores, sorted (ties: lower index kept)."""
    remove = max(0, min(remove, scores.numel() - 1))
    order = torch.argsort(scores.float(), stable=True, descending=True)
    return sorted(order[: scores.numel() - remove].tolist())


def plan_block(
    group_scores: torch.Tensor,
    channel_scores: torch.Tensor,
    costs: BlockCosts,
    target: float,
    heads_removable: bool = True,
    floor_groups: bool = False,
) -> BlockPlan:
    """Remove `target` parameters from one block with the same ratio for heads and MLP.

    The ratio ρ = target / (all group + channel parameters) is applied to the KV groups
    (rounded to whole groups, or floored with `floor_groups`; at least one kept); the MLP
    channels then make up the rest of the budget, so the block loses `target` parameters
    to within one channel.
    """
    n_groups, n_channels = group_scores.numel(), channel_scores.numel()
    removable = n_groups * costs.group + n_channels * costs.channel
    ratio = target / removable
    rounded = math.floor(ratio * n_groups + 1e-9) if floor_groups else round(ratio * n_groups)
    drop_groups = min(rounded, n_groups - 1) if heads_removable else 0
    drop_channels = round(max(0.0, target - drop_groups * costs.group) / costs.channel)
    return BlockPlan(keep_top(group_scores, drop_groups), keep_top(channel_scores, drop_channels))


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(s − mean) / std over one block's structures of one kind (0 when constant)."""
    scores = scores.double()
    std = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
    centered = scores - scores.mean()
    return centered / std if std > 0 else torch.zeros_like(centered)


def plan_global(
    group_scores: list[torch.Tensor],
    channel_scores: list[torch.Tensor],
    costs: list[BlockCosts],
    target: float,
    heads_removable: bool = True,
) -> list[BlockPlan]:
    """Remove the lowest-scoring structures of the whole model until `target` parameters
    are removed (scores must be comparable across blocks, e.g. standardized).

    Structures are taken in ascending score; one that would exceed the budget or empty
    a block is skipped, so the removed count is within one structure of the target.
    """
    items = []  # (score, block, kind, index, cost)
    for b, (gs, cs, cost) in enumerate(zip(group_scores, channel_scores, costs, strict=True)):
        if heads_removable:
            items += [(float(s), b, 0, i, cost.group) for i, s in enumerate(gs.tolist())]
        items += [(float(s), b, 1, i, cost.channel) for i, s in enumerate(cs.tolist())]
    items.sort(key=lambda item: (item[0], item[1], item[2], item[3]))
    left = [[gs.numel(), cs.numel()] for gs, cs in zip(group_scores, channel_scores, strict=True)]
    removed = [[set(), set()] for _ in costs]
    budget = target
    for _, b, kind, index, cost in items:
        if cost <= budget and left[b][kind] > 1:
            removed[b][kind].add(index)
            left[b][kind] -= 1
            budget -= cost
    return [
        BlockPlan(
            [i for i in range(gs.numel()) if i not in gone[0]],
            [i for i in range(cs.numel()) if i not in gone[1]],
        )
        for gs, cs, gone in zip(group_scores, channel_scores, removed, strict=True)
    ]


@dataclass(frozen=True)
class WidthCost:
    """A block's parameter count as a function of its widths: one KV group, one MLP
    channel and the rest of the block, each split into the part proportional to the
    hidden size (weights, norm scales, o / down biases) and the part that is not
    (q / k / v / gate / up biases, per-head norms)."""

    group: int
    channel: int
    fixed: int
    group_other: int
    channel_other: int
    fixed_other: int

    def at(self, kv: Number, channels: Number, hidden: Number) -> Number:
        """Parameters with `kv` groups, `channels` channels and `hidden` as a share of D
        (numbers or tensors: expected counts are differentiable)."""
        scaled = self.fixed - self.fixed_other
        scaled = scaled + kv * (self.group - self.group_other)
        scaled = scaled + channels * (self.channel - self.channel_other)
        rest = self.fixed_other + kv * self.group_other + channels * self.channel_other
        return hidden * scaled + rest


def width_cost(adapter: ModelAdapter, block: nn.Module) -> WidthCost:
    """`WidthCost` of `block` from its current shapes."""
    widths, costs = block_widths(adapter, block), block_costs(adapter, block)
    other = {"group": 0, "channel": 0}
    for role, where in structure_ids(adapter, block).items():
        bias = getattr(adapter.linear(block, role), "bias", None)
        if where.axis == 0 and bias is not None:
            other["group" if role in ATTENTION else "channel"] += int((where.ids == 0).sum())
    total = sum(p.numel() for p in block.parameters())
    fixed = total - widths.kv_heads * costs.group - widths.intermediate * costs.channel
    scaled = sum(adapter.norm(block, r).weight.numel() for r in adapter.spec.norms)
    for role in OUTPUTS:
        bias = getattr(adapter.linear(block, role), "bias", None)
        scaled += 0 if bias is None else bias.numel()
    return WidthCost(
        costs.group, costs.channel, fixed, other["group"], other["channel"], fixed - scaled
    )
