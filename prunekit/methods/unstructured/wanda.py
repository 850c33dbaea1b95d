"""Wanda (Sun et al., ICLR 2024): importance |W_ij| · ‖X_j‖₂, compared within each output row."""

from __future__ import annotations

import torch

from prunekit.engine.runner import LayerStats
from prunekit.methods.base import register
from prunekit.methods.unstructured.layerwise import ScoreMethod


@register
class Wanda(ScoreMethod):
    name = "wanda"
    summary = "|W| times input-activation norm per column, per output row"
    needs = ("input_norm",)

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.abs() * stats["input_norm"].to(weight.device).unsqueeze(0)
