"""Wanda-SP (FLAP's `prune_wanda_sp` baseline): Wanda scores |W_ij|·‖X_j‖₂ of structures.

By default (`weights=output`, the reference): an MLP channel's importance is the mean
over rows of its down_proj column's Wanda scores, a KV group's the sum of those means
over its heads' o_proj input columns. `weights=all` sums the Wanda scores over every
weight of the structure instead (q/k/v rows and o columns; gate/up rows and the down
column), X being each linear's own input.
"""

from __future__ import annotations

from torch import nn

from prunekit.methods.base import MethodConfig, register
from prunekit.methods.width.base import (
    BlockScores,
    BlockStats,
    StructuredMethod,
    StructureWeightsConfig,
    output_columns,
    summed_scores,
    weight_values,
)
from prunekit.models.adapter import ModelAdapter


@register
class WandaSP(StructuredMethod):
    name = "wanda_sp"
    summary = "remove KV groups / MLP channels with the smallest o/down Wanda scores"
    needs = ("input_norm",)
    Config = StructureWeightsConfig

    def __init__(self, config: MethodConfig | None = None):
        super().__init__(config)
        self.needs_roles = ("o", "down") if self.config.weights == "output" else None

    def score(self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats) -> BlockScores:
        paths = adapter.spec.linears
        norm = lambda role: stats[paths[role]]["input_norm"]  # noqa: E731
        if self.config.weights == "all":
            values = weight_values(adapter, block, norm)
        else:
            values = output_columns(
                adapter, block, lambda w, role: (w.abs() * norm(role).to(w.device)).mean(0)
            )
        groups, channels = summed_scores(adapter, block, values)
        return BlockScores(groups, channels, stats)
