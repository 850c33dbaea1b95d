"""Magnitude pruning: keep the largest |W| (per row, per layer, or N:M). Data-free."""

from __future__ import annotations

import torch

from prunekit.engine.runner import LayerStats
from prunekit.methods.base import ScoreMethod, register


@register
class Magnitude(ScoreMethod):
    name = "magnitude"
    summary = "keep the largest |W|; no calibration data"
    needs_calibration = False

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.abs()
