"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning.

- Metric: for each input channel j of the output projections (o_proj, down_proj), the
  fluctuation S_j = Var(X_j) · ‖W_:,j‖², with the sample variance over calibration
  tokens. A KV group's score sums S_j over its heads' o_proj input channels (head_dim
  channels per query head); an MLP channel's score is its down_proj S_j.
- Structure ("selection"): "global" (default) standardizes the scores per block and
  kind and removes the lowest model-wide, so the ratio adapts per block and module;
  "uniform" removes the same share from every block.
- Bias compensation: a removed channel's mean contribution W_:,j · E[X_j] is added to
  the output projection's bias (created when the layer has none), so the block's mean
  output is unchanged. Such a model is saved in the per-layer layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.methods.base import register
from prunekit.methods.width.base import BlockScores, BlockStats, StructuredConfig, StructuredMethod
from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.surgery.plan import BlockPlan, structure_ids, structure_sums
from prunekit.surgery.width import add_output_bias


@dataclass
class FLAPConfig(StructuredConfig):
    selection: str = "global"
    bias_compensation: bool = True  # add removed channels' mean output to the bias


@register
class FLAP(StructuredMethod):
    name = "flap"
    summary = "fluctuation Var(X_j)·‖W_j‖² of output-projection inputs, adaptive, bias fix"
    Config = FLAPConfig
    needs = ("input_variance", "input_mean")
    needs_roles = ("o", "down")

    def score(self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats) -> BlockScores:
        paths = adapter.spec.linears
        values = {}
        for role in ("o", "down"):
            weight = weight_matrix(adapter.linear(block, role)).float()
            variance = stats[paths[role]]["input_variance"].to(weight.device)
            values[role] = weight.pow(2) * variance.unsqueeze(0)
        per_role = structure_sums(adapter, block, values)
        return BlockScores(per_role["o"], per_role["down"], stats)

    def compensate(
        self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats, plan: BlockPlan
    ) -> None:
        if not self.config.bias_compensation:
            return
        ids = structure_ids(adapter, block)
        kept = {"o": plan.groups, "down": plan.channels}
        if not adapter.spec.heads_removable:
            del kept["o"]
        for role, keep in kept.items():
            removed = ~torch.isin(ids[role].ids, torch.as_tensor(keep, dtype=torch.long))
            if not removed.any():
                continue
            module = adapter.linear(block, role)
            weight = weight_matrix(module).float()
            mean = stats[adapter.spec.linears[role]]["input_mean"].to(weight.device)
            cols = removed.nonzero().flatten().to(weight.device)
            add_output_bias(module, weight[:, cols] @ mean[cols])
