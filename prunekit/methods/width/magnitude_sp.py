"""Magnitude-SP (FLAP's `prune_magnitude_sp` baseline). Data-free.

By default (`weights=output`, the reference): an MLP channel's importance is the L2 norm
of its down_proj column ‖W_:,j‖₂, a KV group's the sum of those norms over its heads'
o_proj input columns. `weights=all` sums |W| over every weight of the structure instead
(q/k/v rows and o columns; gate/up rows and the down column).
"""

from __future__ import annotations

from torch import nn

from prunekit.methods.base import register
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
class MagnitudeSP(StructuredMethod):
    name = "magnitude_sp"
    summary = "remove KV groups / MLP channels with the smallest o/down column norms; no data"
    needs_calibration = False
    Config = StructureWeightsConfig

    def score(self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats) -> BlockScores:
        if self.config.weights == "all":
            values = weight_values(adapter, block)
        else:
            values = output_columns(adapter, block, lambda w, role: w.pow(2).sum(0).sqrt())
        groups, channels = summed_scores(adapter, block, values)
        return BlockScores(groups, channels, stats)
