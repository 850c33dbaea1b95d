"""The shared driver of width-pruning methods (magnitude-SP, Wanda-SP, FLAP, LLM-Pruner).

A structured method scores every KV group and MLP channel of each block (higher = keep);
this driver turns the scores into kept structures under a parameter budget and applies
the surgery. "sparsity" is the share of decoder-block parameters removed.

Budget split, `selection` option:
- "uniform": every block loses its share of the budget (`sparsity`, or the allocation's
  per-block ratio); inside a block heads and MLP take the same ratio, heads rounded to
  whole KV groups and the MLP channels absorbing the rounding (see `plan_block`).
  Blocks are pruned as the sequential engine reaches them, so later blocks are scored
  on the pruned model's activations.
- "global": scores are standardized per block and kind, and the lowest-scoring
  structures of the whole model are removed until the budget is spent (weighted by
  their parameter counts; see `plan_global`). Scores come from one pass over the dense
  model. Allocation ratios are not used in this mode.
`protect_first` / `protect_last` blocks are never pruned; their share goes to the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunekit.engine.runner import LayerStats, SequentialRunner
from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import Method, MethodConfig, PruneRequest
from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.models.offload import block_in_memory
from prunekit.surgery.plan import (
    ATTENTION,
    MLP,
    BlockPlan,
    block_costs,
    combine,
    linear_values,
    plan_block,
    plan_global,
    standardize,
    structure_sums,
)
from prunekit.surgery.width import (
    block_parameters,
    block_widths,
    decoder_parameters,
    keep_channels,
    keep_heads,
    update_config_widths,
)

SELECTIONS = ("uniform", "global")

BlockStats = dict[str, LayerStats]  # linear path -> statistic name -> tensor


@dataclass
class StructuredConfig(MethodConfig):
    selection: str = "uniform"  # uniform (per block) | global (standardized, model-wide)
    protect_first: int = 0  # first blocks left unpruned
    protect_last: int = 0  # last blocks left unpruned

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise choice_error("selection", self.selection, SELECTIONS)
        if self.protect_first < -1 or self.protect_last < -1:
            raise PrunekitError("protect_first and protect_last must be >= 0 (or -1: auto)")

    def protected_ends(self, num_blocks: int) -> tuple[int, int]:
        """(first, last) blocks left unpruned in a model of `num_blocks` blocks; -1 (auto)
        means none here (methods with a reference setting override this)."""
        return max(self.protect_first, 0), max(self.protect_last, 0)


STRUCTURE_WEIGHTS = ("output", "all")


@dataclass
class StructureWeightsConfig(StructuredConfig):
    """`weights`: which weights score a structure: "output" (its o_proj / down_proj input
    columns, as FLAP's baselines) or "all" (every weight of the structure)."""

    weights: str = "output"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights not in STRUCTURE_WEIGHTS:
            raise choice_error("weights", self.weights, STRUCTURE_WEIGHTS)


@dataclass
class BlockScores:
    """Importance of each KV group [kv_heads] and MLP channel [intermediate] of a block."""

    groups: torch.Tensor
    channels: torch.Tensor
    stats: BlockStats


def summed_scores(
    adapter: ModelAdapter, block: nn.Module, values: dict[str, torch.Tensor], how: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight values [out, in] per role -> (group scores, channel scores), each role's
    slice summed, then roles aggregated by `how` (sum, max, prod, last)."""
    per_role = structure_sums(adapter, block, values)
    return combine(per_role, ATTENTION, how), combine(per_role, MLP, how)


def output_columns(adapter: ModelAdapter, block: nn.Module, fn) -> dict[str, torch.Tensor]:
    """`{"o": ..., "down": ...}`: `fn(weight [out, in] float, role) -> [in]` per input column
    of the output projections, shaped [1, in] for `summed_scores`."""
    return {
        role: fn(weight_matrix(adapter.linear(block, role)).float(), role).unsqueeze(0)
        for role in ("o", "down")
        if role in adapter.spec.linears
    }


def check_reachable(method: str, sparsity: float, most: float, floor: str) -> None:
    """Refuse a decoder-parameter share `sparsity` beyond the `most` this model allows,
    naming the `floor` (what must stay) and the valid range."""
    if sparsity > most + 1e-9:
        raise PrunekitError(
            f"{method} can remove at most {most:.1%} of this model's decoder-block parameters "
            f"({floor}); valid: sparsity <= {most:.3f}"
        )


class StructuredMethod(Method):
    """Base of width-pruning methods: implement `score` (or `block_scores` for more)."""

    compute_dtypes = True

    kind = "structured"
    supports_nm = False
    sparsity_meaning: ClassVar[str] = "share of decoder-block parameters removed"
    Config: ClassVar[type[MethodConfig]] = StructuredConfig
    needs: ClassVar[tuple[str, ...]] = ()  # statistics gathered per block
    needs_roles: ClassVar[tuple[str, ...] | None] = None  # linears they are gathered on
    floor_groups: ClassVar[bool] = False  # floor (not round) the KV groups a block loses
    distributes = True
    # scores come from one block's weights and statistics: with blocks on disk, uniform
    # selection prunes each block as it is read; global selection reads the blocks twice
    # (score, then apply)
    streams = True

    def score(self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats) -> BlockScores:
        raise NotImplementedError

    def compensate(
        self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats, plan: BlockPlan
    ) -> None:
        """Called before the surgery with the block's plan (e.g. FLAP's bias compensation)."""

    def global_scores(
        self, adapter: ModelAdapter, block: nn.Module, scores: BlockScores
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores comparable across blocks for `selection=global`: (groups, channels), each
        standardized over its block (override for a method's own normalisation)."""
        return standardize(scores.groups), standardize(scores.channels)

    # -- scoring ---------------------------------------------------------------------
    def block_scores(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest, dense: bool
    ) -> Iterator[tuple[int, nn.Module, BlockScores]]:
        """Yield `(index, block, scores)` in block order. With a sequential runner the
        caller may prune the block before the next one is scored (`dense=False`)."""
        adapter = lm.adapter
        if not self.needs:
            for index, block in enumerate(adapter.blocks):
                with block_in_memory(adapter, index, keep=not dense):
                    yield index, block, self.score(adapter, block, {})
            return
        if calib is None:
            raise PrunekitError(f"method {self.name!r} needs calibration data")
        runner = SequentialRunner(
            adapter,
            calib,
            device=request.device,
            batch_size=request.batch_size,
            propagate="dense" if dense else "pruned",
            compute_dtype=request.compute_dtype,
            writes=not dense,
        )
        for ctx in runner:
            modules = None
            if self.needs_roles is not None:
                modules = {
                    adapter.spec.linears[r]: adapter.linear(ctx.block, r)
                    for r in self.needs_roles
                    if r in adapter.spec.linears
                }
            stats = ctx.collect(self.needs, modules)
            yield ctx.index, ctx.block, self.score(adapter, ctx.block, stats)

    # -- budget ----------------------------------------------------------------------
    def _targets(self, adapter: ModelAdapter, request: PruneRequest) -> list[float]:
        """Parameters to remove from each block (protected blocks: 0)."""
        sizes = [block_parameters(b) for b in adapter.blocks]
        n = len(sizes)
        first, last = self.config.protected_ends(n)
        protected = set(range(min(first, n))) | set(range(max(n - last, 0), n))
        if len(protected) == n:
            raise PrunekitError(
                f"protecting the first {first} and last {last} blocks leaves none of the {n} "
                "blocks to prune; lower --opt protect_first / protect_last"
            )
        total = sum(request.target(i).sparsity * s for i, s in enumerate(sizes))
        most = sum(
            self._removable(adapter, block)
            for i, block in enumerate(adapter.blocks)
            if i not in protected
        )
        check_reachable(
            self.name,
            total / sum(sizes),
            most / sum(sizes),
            "one KV group and one MLP channel stay in every block"
            + (f", the {len(protected)} protected block(s) stay whole" if protected else ""),
        )
        raw = [
            0.0 if i in protected else request.target(i).sparsity * s for i, s in enumerate(sizes)
        ]
        if sum(raw) == 0:
            return raw
        return [r * total / sum(raw) for r in raw]

    @staticmethod
    def _removable(adapter: ModelAdapter, block: nn.Module) -> int:
        """Most parameters surgery can take from `block`: all but one KV group (when
        heads are removable) and all but one MLP channel."""
        costs, widths = block_costs(adapter, block), block_widths(adapter, block)
        groups = (widths.kv_heads - 1) * costs.group if adapter.spec.heads_removable else 0
        return groups + (widths.intermediate - 1) * costs.channel

    # -- driver ----------------------------------------------------------------------
    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        config = self.config
        adapter = lm.adapter
        before = decoder_parameters(adapter)
        targets = self._targets(adapter, request)
        removable = adapter.spec.heads_removable
        plans: dict[int, BlockPlan] = {}
        if config.selection == "uniform":
            for index, block, scores in self.block_scores(lm, calib, request, dense=False):
                costs = block_costs(adapter, block)
                plan = plan_block(
                    scores.groups,
                    scores.channels,
                    costs,
                    targets[index],
                    removable,
                    self.floor_groups,
                )
                self._apply(adapter, block, scores.stats, plan)
                plans[index] = plan
        else:
            pool, normalised = [], []  # global scores read the weights: score in the pass
            for index, block, scores in self.block_scores(lm, calib, request, dense=True):
                if targets[index] > 0:
                    pool.append((index, block, scores))
                    normalised.append(self.global_scores(adapter, block, scores))
            chosen = plan_global(
                [groups for groups, _ in normalised],
                [channels for _, channels in normalised],
                [block_costs(adapter, b) for _, b, _ in pool],
                sum(targets),
                removable,
            )
            for (index, block, scores), plan in zip(pool, chosen, strict=True):
                with block_in_memory(adapter, index, keep=True):
                    self._apply(adapter, block, scores.stats, plan)
                plans[index] = plan
            for index in range(len(adapter.blocks)):  # blocks left whole are written too
                if index not in plans:
                    with block_in_memory(adapter, index, keep=True):
                        pass
        update_config_widths(adapter)
        after = decoder_parameters(adapter)
        first, last = config.protected_ends(adapter.num_layers)
        return {
            "selection": config.selection,
            "protected_blocks": {"first": first, "last": last},
            "decoder_parameters_before": before,
            "decoder_parameters_after": after,
            "decoder_share_removed": round(1 - after / before, 6),
            "kept": {
                str(i): {"kv_groups": p.groups, "channels": p.channels}
                for i, p in sorted(plans.items())
            },
        }

    def _apply(
        self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats, plan: BlockPlan
    ) -> None:
        self.compensate(adapter, block, stats, plan)
        if adapter.spec.heads_removable:
            keep_heads(adapter, block, plan.groups)
        keep_channels(adapter, block, plan.channels)


def weight_values(adapter: ModelAdapter, block: nn.Module, scale=None) -> dict[str, torch.Tensor]:
    """|W| per role, optionally times a per-input-column scale `scale(role) -> [in]`."""

    def value(role: str, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        v = weight.float().abs()
        return v if scale is None else v * scale(role).to(v.device).unsqueeze(0)

    return linear_values(adapter, block, value)
