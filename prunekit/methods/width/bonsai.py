"""Bonsai (Dery et al., 2024, "Everybody Prune Now"): structured pruning from forward
passes only.

Units are KV groups (a KV head with its query heads) and groups of MLP channels. Each
round samples sub-models that keep every remaining unit with probability `keep_ratio`,
measures each sub-model's calibration loss (mean token NLL) with the dropped units
zeroed by hooks, and fits a ridge regression of the loss on the keep masks. A unit's
coefficient estimates how much keeping it lowers the loss; units with the smallest
loss increase per parameter are removed until the round's share of the parameter
budget is spent. After the last round the removed units are cut out by the surgery.

MLP channels are grouped so the regression has few enough unknowns: within a block the
channels are sorted by a data-free magnitude score (the magnitude-SP sum of |W| over
each channel's weights) and cut into groups of `channel_group`, so a group holds
channels of similar size rather than arbitrary neighbours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.eval.perplexity import window_nll
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.methods.width.base import check_reachable, summed_scores, weight_values
from prunekit.models.adapter import ModelAdapter
from prunekit.models.loading import LoadedModel
from prunekit.progress import progress as tqdm
from prunekit.surgery.plan import block_costs
from prunekit.surgery.width import (
    block_widths,
    decoder_parameters,
    keep_channels,
    keep_heads,
    update_config_widths,
)

GROUP, CHANNELS = "kv_group", "channels"


@dataclass
class BonsaiConfig(MethodConfig):
    iterations: int = 4  # pruning rounds; each removes its share of the budget
    samples: int = 64  # sub-models evaluated per round
    keep_ratio: float = 0.9  # probability that a sub-model keeps each remaining unit
    channel_group: int = 32  # MLP channels per prunable unit
    ridge: float = 1.0  # L2 penalty of the importance regression

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.samples < 2 or self.channel_group < 1:
            raise PrunekitError("iterations and channel_group must be >= 1, samples >= 2")
        if not 0.0 < self.keep_ratio < 1.0:
            raise PrunekitError(f"keep_ratio must be in (0, 1), got {self.keep_ratio}")
        if self.ridge < 0:
            raise PrunekitError(f"ridge must be >= 0, got {self.ridge}")


@dataclass(frozen=True)
class Unit:
    """One prunable structure: KV groups or MLP channels `members` of block `block`."""

    block: int
    kind: str  # GROUP or CHANNELS
    members: tuple[int, ...]
    cost: int  # parameters removed with it


def build_units(adapter: ModelAdapter, channel_group: int) -> list[Unit]:
    """Every block's KV groups (when heads are removable) and MLP channel groups."""
    units = []
    for index, block in enumerate(adapter.blocks):
        costs, widths = block_costs(adapter, block), block_widths(adapter, block)
        if adapter.spec.heads_removable and widths.kv_heads > 1:
            units += [Unit(index, GROUP, (g,), costs.group) for g in range(widths.kv_heads)]
        _, magnitude = summed_scores(adapter, block, weight_values(adapter, block))
        order = torch.argsort(magnitude, stable=True)
        for chunk in order.split(channel_group):
            members = tuple(sorted(chunk.tolist()))
            units.append(Unit(index, CHANNELS, members, costs.channel * len(members)))
    return units


class StructureMasks:
    """Zero removed units by scaling the inputs of each block's o and down projections.

    Dropping a KV group's query-head outputs before o, or channels before down, gives
    exactly the function of the model with those structures cut out.
    """

    def __init__(self, adapter: ModelAdapter, units: list[Unit]):
        self.adapter = adapter
        self.units = units
        self.head_width = adapter.head_dim * (adapter.num_heads // adapter.num_kv_heads)
        self.groups: list[torch.Tensor] = []
        self.channels: list[torch.Tensor] = []
        for block in adapter.blocks:
            widths = block_widths(adapter, block)
            self.groups.append(torch.ones(widths.kv_heads))
            self.channels.append(torch.ones(widths.intermediate))

    def set_alive(self, alive: torch.Tensor) -> None:
        """Keep exactly the units with `alive[i]` True ([units], bool)."""
        for mask in (*self.groups, *self.channels):
            mask.fill_(1.0)
        for unit, keep in zip(self.units, alive.tolist(), strict=True):
            if not keep:
                target = self.groups if unit.kind == GROUP else self.channels
                target[unit.block][list(unit.members)] = 0.0

    @contextmanager
    def attached(self) -> Iterator[StructureMasks]:
        """Hooks that apply the masks while the context is open."""

        def hook(mask: torch.Tensor, repeat: int):
            def fn(module: nn.Module, args: tuple) -> tuple:
                x = args[0]
                scale = mask.repeat_interleave(repeat).to(device=x.device, dtype=x.dtype)
                return (x * scale, *args[1:])

            return fn

        handles = []
        for index, block in enumerate(self.adapter.blocks):
            o, down = self.adapter.linear(block, "o"), self.adapter.linear(block, "down")
            handles.append(o.register_forward_pre_hook(hook(self.groups[index], self.head_width)))
            handles.append(down.register_forward_pre_hook(hook(self.channels[index], 1)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) of `model` over `windows` [n, L]."""
    total, count = window_nll(model, windows, batch_size, progress=False)
    return total / count


def ridge_fit(keep: torch.Tensor, loss: torch.Tensor, penalty: float) -> torch.Tensor:
    """Coefficients β [units] of loss ≈ β₀ + keep · β (keep [samples, units]), ridge."""
    x = keep.double() - keep.double().mean(0)
    y = loss.double() - loss.double().mean()
    gram = x.t() @ x + penalty * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.t() @ y)


def estimate_harm(
    model: nn.Module,
    windows: torch.Tensor,
    masks: StructureMasks,
    alive: torch.Tensor,
    config: BonsaiConfig,
    generator: torch.Generator,
    batch_size: int = 8,
) -> tuple[torch.Tensor, dict]:
    """Estimated loss increase (nats) from removing each alive unit ([units], NaN for
    removed ones), from `config.samples` random sub-models; also facts about the fit."""
    candidates = alive.nonzero().flatten()
    keep = torch.rand(config.samples, candidates.numel(), generator=generator) < config.keep_ratio
    losses = torch.empty(config.samples, dtype=torch.float64)
    for s in tqdm(range(config.samples), desc="bonsai sub-models", leave=False):
        state = alive.clone()
        state[candidates[~keep[s]]] = False
        masks.set_alive(state)
        losses[s] = mean_loss(model, windows, batch_size)
    masks.set_alive(alive)
    beta = ridge_fit(keep, losses, config.ridge)
    harm = torch.full((alive.numel(),), float("nan"), dtype=torch.float64)
    harm[candidates] = -beta
    fitted = (keep.double() - keep.double().mean(0)) @ beta + losses.mean()
    spread = (losses - losses.mean()).pow(2).sum().clamp_min(1e-30)
    r2 = 1 - float((losses - fitted).pow(2).sum() / spread)
    return harm, {"mean_submodel_loss": float(losses.mean()), "fit_r2": round(r2, 4)}


def select_removals(
    harm: torch.Tensor, units: list[Unit], alive: torch.Tensor, budget: float
) -> list[int]:
    """Alive units with the least harm per parameter, while their cost fits `budget`;
    a block always keeps at least one KV group and one channel unit."""
    left: dict[tuple[int, str], int] = {}
    for unit, keep in zip(units, alive.tolist(), strict=True):
        if keep:
            left[unit.block, unit.kind] = left.get((unit.block, unit.kind), 0) + 1
    candidates = alive.nonzero().flatten().tolist()
    order = sorted(candidates, key=lambda i: (float(harm[i]) / units[i].cost, i))
    chosen = []
    for i in order:
        unit = units[i]
        if unit.cost <= budget and left[unit.block, unit.kind] > 1:
            chosen.append(i)
            left[unit.block, unit.kind] -= 1
            budget -= unit.cost
    return chosen


def remove_units(adapter: ModelAdapter, units: list[Unit], alive: torch.Tensor) -> dict:
    """Cut the dead units out of the blocks; `{block: {"kv_groups", "channels"}}` kept."""
    kept = {}
    for index, block in enumerate(adapter.blocks):
        widths = block_widths(adapter, block)
        groups, channels = set(range(widths.kv_heads)), set(range(widths.intermediate))
        for unit, keep in zip(units, alive.tolist(), strict=True):
            if unit.block == index and not keep:
                (groups if unit.kind == GROUP else channels).difference_update(unit.members)
        if len(groups) < widths.kv_heads:
            keep_heads(adapter, block, sorted(groups))
        if len(channels) < widths.intermediate:
            keep_channels(adapter, block, sorted(channels))
        kept[str(index)] = {"kv_groups": sorted(groups), "channels": sorted(channels)}
    update_config_widths(adapter)
    return kept


@register
class Bonsai(Method):
    name = "bonsai"
    summary = "forward passes of random sub-models, regression of loss on kept structures"
    kind = "structured"
    supports_nm = False
    sparsity_meaning = "share of decoder-block parameters removed"
    no_allocation = "bonsai chooses where to prune itself"
    Config = BonsaiConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        config, adapter, model = self.config, lm.adapter, lm.model
        before = decoder_parameters(adapter)
        target = request.sparsity * before
        units = build_units(adapter, config.channel_group)
        cheapest: dict[tuple[int, str], int] = {}
        for unit in units:
            key = unit.block, unit.kind
            cheapest[key] = min(cheapest.get(key, unit.cost), unit.cost)
        most = sum(unit.cost for unit in units) - sum(cheapest.values())
        check_reachable(
            self.name,
            request.sparsity,
            most / before,
            f"one KV group and one unit of {config.channel_group} MLP channels stay per block",
        )
        alive = torch.ones(len(units), dtype=torch.bool)
        generator = torch.Generator().manual_seed(request.seed)
        home = next(model.parameters()).device
        model.to(request.device)
        masks = StructureMasks(adapter, units)
        removed, rounds = 0, []
        with masks.attached():
            for step in tqdm(range(config.iterations), desc="bonsai rounds", leave=False):
                budget = target * (step + 1) / config.iterations - removed
                harm, fit = estimate_harm(
                    model, calib, masks, alive, config, generator, request.batch_size
                )
                chosen = select_removals(harm, units, alive, budget)
                alive[chosen] = False
                removed += sum(units[i].cost for i in chosen)
                masks.set_alive(alive)
                loss = mean_loss(model, calib, request.batch_size)
                rounds.append({**fit, "removed_units": len(chosen), "loss_after": round(loss, 6)})
        model.to(home)
        kept = remove_units(adapter, units, alive)
        after = decoder_parameters(adapter)
        return {
            "units": len(units),
            "decoder_parameters_before": before,
            "decoder_parameters_after": after,
            "decoder_share_removed": round(1 - after / before, 6),
            "rounds": rounds,
            "kept": kept,
        }
