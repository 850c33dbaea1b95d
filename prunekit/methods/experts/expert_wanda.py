"""Wanda inside the experts of a mixture-of-experts model, with the statistics of the
tokens actually routed to each expert (Sun et al.'s |W_ij|·‖X_j‖₂ per output row).

For expert e, X is the inputs of the tokens routed to e: the layer input for the fused
gate/up weight [2I, H] and act(gate)·up for the down weight [H, I]. Each row keeps the
highest scores under `--sparsity` / `--pattern` (row scope, N:M along the input). An
expert that no calibration token reached is left dense and listed in the record
(`experts_no_calibration_token_reached`); it is not pruned by magnitude behind the
user's back. Attention linears are not touched: run a mask method before it (a recipe).
"""

from __future__ import annotations

import torch

from prunekit.methods.base import Method, PruneRequest, register
from prunekit.methods.experts.routed import RoutedSums, routed_pass
from prunekit.models.loading import LoadedModel
from prunekit.surgery.masks import make_mask


def squared_norms(tokens: torch.Tensor) -> torch.Tensor:
    """Σ x² per feature over tokens [t, F], in float64: [F]."""
    return tokens.double().pow(2).sum(0)


@register
class ExpertWanda(Method):
    name = "expert_wanda"
    summary = "Wanda inside every expert, from the tokens routed to it (MoE)"
    kind = "experts"
    sparsity_meaning = "share of weights zeroed in every expert weight row"

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        adapter = lm.adapter
        modules = [adapter.moe(block) for block in adapter.blocks]
        sums = [RoutedSums(moe, squared_norms) for moe in modules]
        stats = routed_pass(lm, calib, request, sums)
        unreached = {}
        with torch.no_grad():
            for i, (moe, s) in enumerate(zip(modules, stats, strict=True)):
                missed = []
                for weight, norms in s.reached_weights(moe, missed):
                    scores = weight.float().abs() * norms.sqrt().float().unsqueeze(0)
                    weight.mul_(make_mask(scores, request.target(i)).to(weight.dtype))
                if missed:
                    unreached[str(i)] = missed
        return {"experts_no_calibration_token_reached": unreached}
