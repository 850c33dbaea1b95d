"""DaSS (Guo et al., 2024): dependency-aware semi-structured sparsity for MLPs.

Every output channel i of the MLP's input projections (gate and up, fused gate_up, or
fc1 of a plain MLP) produces one intermediate channel Z_i, which down (fc2) reads as its
input column i. DaSS scores those weights by their magnitude and the intermediate
activation norm of the channel they feed:

    gate/up:  score_ij = |W_ij| · ‖Z_i‖₂^alpha       (alpha = 0.5 as in the reference)
    down:     score_ij = |W_ij| · ‖Z_j‖₂             (Wanda on the intermediate)

and compares gate/up weights across output channels: per input column for unstructured
masks, and in N:M groups of consecutive output channels (so gate/up masks are N:M along
the output dimension, i.e. Wᵀ is N:M, as in the paper). As in the reference (its
`pres_module` holds only gate/up/down), attention stays dense by default, so the overall
sparsity is the MLP's share of the target; `--opt attention=true` prunes attention with
Wanda as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.engine.runner import BlockContext, LayerStats
from prunekit.methods.base import MethodConfig, PruneRequest, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.surgery.masks import Target, make_mask

INPUT_PROJECTIONS = ("gate", "up", "gate_up")


@dataclass
class DaSSConfig(MethodConfig):
    alpha: float = 0.5  # exponent of the intermediate activation norm for gate/up
    attention: bool = False  # also prune attention linears (with Wanda); off in the reference


def input_projection_scores(weight: torch.Tensor, inter_norm: torch.Tensor, alpha: float):
    """DaSS scores of a gate/up weight [k · I, H] from ‖Z‖ [I]: [k · I, H]."""
    channel = inter_norm.float().pow(alpha).repeat(weight.shape[0] // inter_norm.numel())
    return weight.abs().float() * channel.unsqueeze(1)


def input_projection_mask(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """Mask comparing across output channels: per column, or N:M along the output axis."""
    return make_mask(scores.t(), target).t()


@register
class DaSS(LayerwiseMethod):
    name = "dass"
    summary = "MLP weights scored with their intermediate channel's activation norm"
    needs = ("input_norm",)
    Config = DaSSConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        roles = lm.adapter.spec.linears  # MLP width % M is checked by prune()
        facts = super().run(lm, calib, request)  # e.g. what a weight update did
        mlp = [r for r in INPUT_PROJECTIONS if r in roles]
        pruned = [r for r in roles if self.config.attention or r in (*INPUT_PROJECTIONS, "down")]
        return facts | {
            "nm_along_output": mlp if request.pattern.is_nm else [],
            "pruned_roles": pruned,
        }

    def prune_block(self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target) -> None:
        roles = ctx.adapter.spec.linears
        inter = stats[roles["down"]]["input_norm"] if "down" in roles else None
        for path, module in ctx.linears().items():
            role = ctx.adapter.role(path)
            if not self.config.attention and role not in (*INPUT_PROJECTIONS, "down"):
                continue
            weight = weight_matrix(module)
            if inter is not None and role in INPUT_PROJECTIONS:
                scores = input_projection_scores(weight, inter.to(weight.device), self.config.alpha)
                mask = input_projection_mask(scores, target)
            else:
                norm = stats[path]["input_norm"].to(weight.device)
                mask = make_mask(weight.abs().float() * norm.unsqueeze(0), target)
            weight.mul_(mask)
