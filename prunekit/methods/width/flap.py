"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning.

- Metric (WIFV, the reference's default): for each input channel j of the output
  projections (o_proj, down_proj), the fluctuation S_j = Var(X_j) · ‖W_:,j‖², with the
  sample variance over calibration tokens. As in the reference, attention uses S_j²: an
  MLP channel's score is its down_proj S_j, a KV group's is built from S_j² over its
  heads' o_proj input channels (head_dim channels per query head).
- Structure ("selection"): "global" (default, the reference's AL-AM) standardizes S_j²
  over all o_proj channels of a block and gives each KV group the mean z-score of its
  channels, standardizes the MLP channels' S_j over the block, and removes the lowest
  model-wide, so the ratio adapts per block and module; "uniform" (UL-UM) removes the
  same share from every block, a KV group scored by the sum of its S_j².
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
from prunekit.surgery.plan import BlockPlan, standardize, structure_ids, structure_sums
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

    @staticmethod
    def fluctuation(adapter: ModelAdapter, block: nn.Module, stats: BlockStats, role: str):
        """S_j = Var(X_j) · ‖W_:,j‖² per input channel of `role` ("o" or "down"): [in]."""
        weight = weight_matrix(adapter.linear(block, role)).float()
        variance = stats[adapter.spec.linears[role]]["input_variance"].to(weight.device)
        return weight.pow(2).sum(0) * variance

    def score(self, adapter: ModelAdapter, block: nn.Module, stats: BlockStats) -> BlockScores:
        attention = self.fluctuation(adapter, block, stats, "o").pow(2)
        per_role = structure_sums(
            adapter,
            block,
            {
                "o": attention.unsqueeze(0),
                "down": self.fluctuation(adapter, block, stats, "down").unsqueeze(0),
            },
        )
        return BlockScores(per_role["o"], per_role["down"], stats)

    def global_scores(
        self, adapter: ModelAdapter, block: nn.Module, scores: BlockScores
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per KV group the mean z-score of its o_proj channels' S_j² (standardized over
        all channels of the block), per MLP channel the z-score of its S_j."""
        z = standardize(self.fluctuation(adapter, block, scores.stats, "o").pow(2))
        ids = structure_ids(adapter, block)["o"].ids.to(z.device)
        groups = torch.zeros(scores.groups.numel(), dtype=z.dtype, device=z.device)
        groups.index_add_(0, ids, z)
        groups /= torch.bincount(ids, minlength=groups.numel()).to(z.dtype)
        return groups, standardize(scores.channels)

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
