"""SparseGPT's OBS update for a given mask: the column sweep of SparseGPT with the pruned
positions fixed in advance (Frantar & Alistarh 2023), as a baseline weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.engine.runner import LayerStats
from prunekit.methods.unstructured.sparsegpt import sparsegpt_prune
from prunekit.methods.unstructured.updates.base import UpdateConfig, WeightUpdate, register_update
from prunekit.surgery.masks import Target


@dataclass
class ObsConfig(UpdateConfig):
    blocksize: int = 128  # columns per lazy update block
    percdamp: float = 0.01  # damping, as a fraction of mean(diag(H))


@register_update
class ObsUpdate(WeightUpdate):
    name = "sparsegpt"
    summary = "SparseGPT's one-pass OBS update of the kept weights, mask given"
    Config = ObsConfig

    def solve(self, dense: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        target = Target(1.0 - float(mask.float().mean()))
        new, _ = sparsegpt_prune(
            dense, stats["hessian"], target, self.config.blocksize, self.config.percdamp, mask
        )
        return new
