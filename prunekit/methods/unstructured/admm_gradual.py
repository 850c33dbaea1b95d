"""Gradual ADMM pruning (Boža 2024, section "gradual pruning"): the mask is re-chosen
from the current ADMM iterate while its sparsity rises on a cubic schedule, then held at
the target while ADMM finishes the weight update.

At iteration t < ramp the sparsity is s·(1 − (1 − (t+1)/ramp)³), reaching the target s at
t = ramp − 1. Each intermediate mask relaxes the target pattern: the positions the target
pattern (row / layer / N:M) would keep stay kept, and among the rest the least important
are pruned up to the current sparsity, so the last mask is exactly the target (valid N:M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine.runner import LayerStats
from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import MethodConfig, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod
from prunekit.methods.unstructured.updates.admm_core import (
    LayerProblem,
    PenalisedInverse,
    check_penalty,
    run_admm,
)
from prunekit.models.adapter import set_weight_matrix, weight_matrix
from prunekit.surgery.masks import Target, layer_mask, make_mask, row_mask

IMPORTANCES = ("norm", "obs")


@dataclass
class AdmmGradualConfig(MethodConfig):
    iterations: int = 20  # ADMM iterations in total (the paper's default)
    ramp: int = 15  # iterations over which the mask sparsity rises to the target
    rho: float = 1.0  # penalty ρ, relative to the unit diagonal of the normalised H
    damp: float = 0.1  # ridge added to the normalised H
    importance: str = "norm"  # norm: |W|·‖X_j‖; obs: |W| / [H⁻¹]_jj

    def __post_init__(self) -> None:
        if not 1 <= self.ramp <= self.iterations:
            raise PrunekitError(
                f"admm_gradual needs 1 <= ramp <= iterations, got {self.ramp}, {self.iterations}"
            )
        check_penalty("admm_gradual", self.rho, self.damp)
        if self.importance not in IMPORTANCES:
            raise choice_error("importance", self.importance, IMPORTANCES)


def cubic_sparsity(target: float, step: int, ramp: int) -> float:
    """Sparsity after `step` + 1 of `ramp` steps: s·(1 − (1 − (step+1)/ramp)³)."""
    progress = min((step + 1) / ramp, 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def relaxed_mask(scores: torch.Tensor, target: Target, sparsity: float) -> torch.Tensor:
    """Mask at `sparsity` <= target.sparsity that contains the target pattern's mask."""
    final = make_mask(scores, target)
    if sparsity >= target.sparsity:
        return final
    boosted = scores.masked_fill(final, float("inf"))
    if target.scope == "layer" and not target.pattern.is_nm:
        return layer_mask(boosted, sparsity)
    return row_mask(boosted, sparsity)


class GradualMasks:
    """The mask rule of the gradual variant: re-chosen until `ramp`, then held."""

    def __init__(self, target: Target, ramp: int, weights: torch.Tensor):
        self.target = target
        self.ramp = ramp
        self.weights = weights  # importance multiplier per input column [in]
        self.mask: torch.Tensor | None = None

    def __call__(self, iteration: int, candidate: torch.Tensor) -> torch.Tensor:
        if self.mask is None or iteration < self.ramp:
            sparsity = cubic_sparsity(self.target.sparsity, iteration, self.ramp)
            scores = candidate.abs() * self.weights.unsqueeze(0)
            self.mask = relaxed_mask(scores, self.target, sparsity)
        return self.mask


@register
class AdmmGradual(LayerwiseMethod):
    name = "admm_gradual"
    summary = "ADMM weight update with the mask re-chosen while sparsity rises (Boža 2024)"
    needs = ("hessian",)
    Config = AdmmGradualConfig

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        config = self.config
        problem = LayerProblem.build(weight_matrix(module), stats["hessian"], config.damp)
        if config.importance == "obs":
            weights = 1.0 / torch.diagonal(PenalisedInverse(problem.hessian)(0.0))
        else:
            weights = torch.ones_like(problem.scale)
        masks = GradualMasks(target, config.ramp, weights)
        result = run_admm(problem, masks, config.iterations, config.rho)
        set_weight_matrix(module, problem.restore(result.weight) * result.mask)
