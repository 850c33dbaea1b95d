"""Wanda-SP: a structure's importance is the sum of Wanda scores |W_ij|·‖X_j‖₂ over all
of its weights (q/k/v rows and o columns; gate/up rows and the down column), with X the
input of each linear over the calibration tokens."""

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
class WandaSP(StructuredMethod):
    name = "wanda_sp"
    summary = "remove KV groups / MLP channels with the smallest summed |W|·‖X‖"
    needs = ("input_norm",)

    def score(self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats) -> BlockScores:
        paths = adapter.spec.linears
        values = weight_values(adapter, block, lambda role: stats[paths[role]]["input_norm"])
        groups, channels = summed_scores(adapter, block, values)
        return BlockScores(groups, channels, stats)
