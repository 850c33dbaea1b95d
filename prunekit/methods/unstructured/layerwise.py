"""The unstructured / N:M family's driver: methods the sequential engine runs block by block.

- `LayerwiseMethod`: the engine drives it block by block; it implements `prune_block` or,
  more often, `prune_linear`.
- `ScoreMethod`: a LayerwiseMethod whose mask comes from an importance score per weight
  (magnitude, Wanda, RIA ...); it implements only `score`.

Any LayerwiseMethod takes an optional weight update (`updates/`, e.g. ADMM): after a
block's linears are pruned, the update re-fits each linear's kept weights against its
dense weights using the block's statistics. Methods need not know about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from prunekit.engine.distributed import assign_by_cost, broadcast, gather_objects, world
from prunekit.engine.runner import BlockContext, LayerStats, SequentialRunner
from prunekit.errors import PrunekitError
from prunekit.methods.base import Method, MethodConfig, PruneRequest
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.surgery.masks import Target, make_mask

if TYPE_CHECKING:
    from prunekit.methods.unstructured.updates.base import WeightUpdate


class LayerwiseMethod(Method):
    """Driven block by block by the sequential engine; statistics named in `needs`.

    `update`, when given, runs after `prune_block` on every linear of the block.
    """

    compute_dtypes = True
    streams = True
    distributes = True

    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig | None = None, update: WeightUpdate | None = None):
        super().__init__(config)
        self.update = update

    def statistics(self) -> list[str]:
        """Collectors the method and its update need, each once."""
        extra = self.update.needs if self.update is not None else ()
        return list(dict.fromkeys((*self.needs, *extra)))

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        if calib is None or (not self.needs_calibration and self.update is None):
            # data-free: walk the blocks without activations
            if self.update is not None:
                raise PrunekitError(f"update {self.update.name!r} needs calibration data")
            offload = lm.adapter.offload
            for index, block in enumerate(lm.adapter.blocks):
                if offload is not None:
                    offload.load(index)
                for path, module in lm.adapter.linears(block).items():
                    self.prune_linear(module, {}, request.target(index), path)
                if offload is not None:
                    offload.unload(index, keep=True)
            return self.details()
        runner = SequentialRunner(
            lm.adapter,
            calib,
            device=request.device,
            batch_size=request.batch_size,
            propagate=request.propagate,
            collect=tuple(self.statistics()),
            overwrite_inputs=True,
            compute_dtype=request.compute_dtype,
            writes=True,
        )
        errors: list[dict[str, float]] = []
        # per-linear work is shared out across ranks; a block-level prune_block is not
        split = world()[1] > 1 and type(self).prune_block is LayerwiseMethod.prune_block
        for ctx in runner:
            target = request.target(ctx.index)
            self.prepare_block(ctx, ctx.stats, target)
            if split:
                errors += self._prune_across_ranks(ctx, target)
                continue
            linears = ctx.linears()
            dense = {p: weight_matrix(m).clone() for p, m in linears.items()} if self.update else {}
            self.prune_block(ctx, ctx.stats, target)
            for path, weight in dense.items():
                errors.append(self.update.apply(linears[path], weight, ctx.stats[path]))
        if split:
            errors = [e for part in gather_objects(errors) for e in part]
            self.merge_rank_facts()
        return {**self.details(), **self.update_facts(errors)}

    def _prune_across_ranks(self, ctx: BlockContext, target: Target) -> list[dict[str, float]]:
        """Each linear of the block pruned (and updated) by one rank, the ranks loaded by
        the cost of a solve (out · in²), then broadcast from its owner: every rank ends
        with the block every rank would have computed, each solve done once."""
        rank, size = world()
        linears = ctx.linears()
        shapes = {p: weight_matrix(m).shape for p, m in linears.items()}
        owner = assign_by_cost({p: float(o) * i * i for p, (o, i) in shapes.items()}, size)
        errors = []
        for path, module in linears.items():
            if owner[path] != rank:
                continue
            dense = weight_matrix(module).clone() if self.update else None
            self.prune_linear(module, ctx.stats.get(path, {}), target, path)
            if dense is not None:
                errors.append(self.update.apply(module, dense, ctx.stats[path]))
        for path, module in linears.items():
            broadcast(module.weight.data, owner[path])
        return errors

    def details(self) -> dict:
        """Method-specific facts gathered while pruning, for the record (override)."""
        return {}

    def merge_rank_facts(self) -> None:
        """After linears were shared out across ranks, combine what each rank's
        `prune_linear` calls gathered for `details` (override when it gathers any)."""

    def update_facts(self, errors: list[dict[str, float]]) -> dict:
        """What the update did, for the record: mean relative layer errors before/after."""
        if self.update is None or not errors:
            return {}
        mean = {key: sum(e[key] for e in errors) / len(errors) for key in ("before", "after")}
        return {
            "update": {
                "name": self.update.name,
                "layers": len(errors),
                "mean_relative_error_before": mean["before"],
                "mean_relative_error_after": mean["after"],
            }
        }

    def prepare_block(
        self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target
    ) -> None:
        """Change the dense block before pruning (e.g. permute channels); the weight update
        re-fits against the block as it is after this step, so a method that reorders a
        linear's inputs replaces `stats[path]` with the reordered statistics (override)."""

    def prune_block(self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target) -> None:
        """Prune every linear of the block; override for block-level dependencies."""
        for path, module in ctx.linears().items():
            self.prune_linear(module, stats.get(path, {}), target, path)

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        raise NotImplementedError


class ScoreMethod(LayerwiseMethod):
    """Mask = the highest `score` per row / layer / N:M group; weights are only zeroed."""

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """Importance of each weight, [out, in] (higher = keep)."""
        raise NotImplementedError

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        weight = weight_matrix(module)
        weight.mul_(make_mask(self.score(weight.float(), stats), target))
