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
from torch import nn

from prunekit.methods.base import Method, PruneRequest, register
from prunekit.methods.experts.expert_prune import routed_pass
from prunekit.methods.experts.routed import routed_inputs
from prunekit.models.loading import LoadedModel
from prunekit.surgery.experts import expert_count
from prunekit.surgery.masks import make_mask


class RoutedNorms:
    """Per expert: Σ x² over routed tokens of the expert's two inputs (layer input [H],
    GLU activation [I]), from a pre-hook on the experts module."""

    def __init__(self, moe: nn.Module):
        experts = moe.experts
        n = expert_count(moe)
        self.x = torch.zeros(n, experts.gate_up_proj.shape[2], dtype=torch.float64)
        self.h = torch.zeros(n, experts.down_proj.shape[2], dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.long)
        self.handle = experts.register_forward_pre_hook(self.hook)

    @torch.no_grad()
    def hook(self, experts: nn.Module, args: tuple) -> None:
        for e, inputs, hidden in routed_inputs(experts, args):
            self.x[e] += inputs.double().pow(2).sum(0)
            self.h[e] += hidden.double().pow(2).sum(0)
            self.count[e] += inputs.shape[0]


@register
class ExpertWanda(Method):
    name = "expert_wanda"
    summary = "Wanda inside every expert, from the tokens routed to it (MoE)"
    kind = "experts"
    sparsity_meaning = "share of weights zeroed in every expert weight row"

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        adapter = lm.adapter
        modules = [adapter.moe(block) for block in adapter.blocks]
        stats = routed_pass(lm, calib, request, [RoutedNorms(moe) for moe in modules])
        unreached = {}
        with torch.no_grad():
            for i, (moe, s) in enumerate(zip(modules, stats, strict=True)):
                experts, target = moe.experts, request.target(i)
                for e in range(expert_count(moe)):
                    if s.count[e] == 0:
                        unreached.setdefault(str(i), []).append(e)
                        continue
                    for weight, norms in (
                        (experts.gate_up_proj[e], s.x[e]),
                        (experts.down_proj[e], s.h[e]),
                    ):
                        scores = weight.float().abs() * norms.sqrt().float().unsqueeze(0)
                        weight.mul_(make_mask(scores, target).to(weight.dtype))
        return {"experts_no_calibration_token_reached": unreached}
