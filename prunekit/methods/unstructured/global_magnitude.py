"""Global magnitude pruning: one |W| threshold over every linear of every block. Data-free."""

from __future__ import annotations

import torch

from prunekit.methods.base import Method, PruneRequest, register
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.surgery.masks import global_masks


@register
class GlobalMagnitude(Method):
    name = "global_magnitude"
    summary = "keep the largest |W| of the whole model (one threshold); no calibration data"
    needs_calibration = False
    supports_nm = False
    no_allocation = "global_magnitude sets its own per-layer sparsity"
    distributes = True  # data-free: every rank computes the same masks

    @torch.no_grad()
    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        weights = {
            f"{i}.{path}": weight_matrix(module)
            for i, block in enumerate(lm.adapter.blocks)
            for path, module in lm.adapter.linears(block).items()
        }
        masks = global_masks({k: w.abs() for k, w in weights.items()}, request.sparsity)
        for name, weight in weights.items():
            weight.mul_(masks[name])
        threshold_weights = [w[masks[k]].abs().min() for k, w in weights.items() if masks[k].any()]
        return {"threshold": float(min(threshold_weights)) if threshold_weights else None}
