"""Magnitude pruning: keep the largest |W| (per layer by default, as locuslab/wanda's
`prune_magnitude` does; per row or N:M on request). Data-free."""

from __future__ import annotations

import torch

from prunekit.engine.runner import LayerStats
from prunekit.methods.base import register
from prunekit.methods.unstructured.layerwise import ScoreMethod


@register
class Magnitude(ScoreMethod):
    name = "magnitude"
    summary = "keep the largest |W|; no calibration data"
    needs_calibration = False
    default_scope = "layer"

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.abs()
