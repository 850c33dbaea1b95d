"""Magnitude-SP: a KV group's or MLP channel's importance is the sum of |W| over all of
its weights (q/k/v rows and o columns; gate/up rows and the down column). Data-free."""

from __future__ import annotations

from torch import nn

from prunekit.methods.base import register
from prunekit.methods.width.base import (
    BlockScores,
    BlockStats,
    StructuredMethod,
    summed_scores,
    weight_values,
)
from prunekit.models.adapter import ModelAdapter


@register
class MagnitudeSP(StructuredMethod):
    name = "magnitude_sp"
    summary = "remove KV groups / MLP channels with the smallest summed |W|; no data"
    needs_calibration = False

    def score(self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats) -> BlockScores:
        groups, channels = summed_scores(adapter, block, weight_values(adapter, block))
        return BlockScores(groups, channels, stats)
