"""Gradual ADMM pruning (Boža 2024, section "gradual pruning"; fmfi-compbio/admm-pruning
`lib/admm.py`): the mask is re-chosen from the current ADMM iterate during the first
`ramp` iterations, then held while ADMM finishes the weight update.

With `schedule=reference` (default) the mask follows the reference code: at layer scope
(its default, `per_out=False`) an unstructured mask is re-chosen at the full target
sparsity in every ramp iteration; N:M and per-row masks ramp on the cubic schedule.
`schedule=cubic` ramps every pattern as the paper describes: at iteration t < ramp the
sparsity is s·(1 − (1 − (t+1)/ramp)³), reaching s at t = ramp − 1.

A ramped mask relaxes the target pattern: the positions the target pattern (row / layer /
N:M) would keep stay kept, and among the rest the least important are pruned up to the
current sparsity (over the whole matrix at layer scope, per row otherwise), so the last
mask is exactly the target (valid N:M).
"""

from __future__ import annotations

import math
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
SCHEDULES = ("reference", "cubic")


@dataclass
class AdmmGradualConfig(MethodConfig):
    iterations: int = 20  # ADMM iterations in total (the paper's default)
    ramp: int = 15  # iterations over which the mask sparsity rises to the target
    rho: float = 1.0  # penalty ρ, relative to the unit diagonal of the normalised H
    damp: float = 0.1  # ridge added to the normalised H
    importance: str = "norm"  # norm: |W|·‖X_j‖; obs: |W| / [H⁻¹]_jj
    schedule: str = "reference"  # reference (lib/admm.py) | cubic (every pattern ramps)

    def __post_init__(self) -> None:
        if not 1 <= self.ramp <= self.iterations:
            raise PrunekitError(
                f"admm_gradual needs 1 <= ramp <= iterations, got {self.ramp}, {self.iterations}"
            )
        check_penalty("admm_gradual", self.rho, self.damp)
        if self.importance not in IMPORTANCES:
            raise choice_error("importance", self.importance, IMPORTANCES)
        if self.schedule not in SCHEDULES:
            raise choice_error("schedule", self.schedule, SCHEDULES)


def cubic_sparsity(target: float, step: int, ramp: int) -> float:
    """Sparsity after `step` + 1 of `ramp` steps: s·(1 − (1 − (step+1)/ramp)³)."""
    progress = min((step + 1) / ramp, 1.0)
    return target * (1.0 - (1.0 - progress) ** 3)


def relaxed_mask(scores: torch.Tensor, target: Target, sparsity: float) -> torch.Tensor:
    """Mask at `sparsity` <= target.sparsity that contains the target pattern's mask; the
    count of zeros is floored, as the reference's int(numel · sparsity)."""
    final = make_mask(scores, target)
    if sparsity >= target.sparsity:
        return final
    boosted = scores.masked_fill(final, float("inf"))
    if target.scope == "layer":
        return layer_mask(boosted, math.floor(scores.numel() * sparsity) / scores.numel())
    return row_mask(boosted, math.floor(scores.shape[1] * sparsity) / scores.shape[1])


class GradualMasks:
    """The mask rule of the gradual variant: re-chosen until `ramp`, then held."""

    def __init__(self, target: Target, ramp: int, weights: torch.Tensor, schedule: str):
        self.target = target
        self.ramp = ramp
        self.weights = weights  # importance multiplier per input column [in]
        self.mask: torch.Tensor | None = None
        unstructured_layer = target.scope == "layer" and not target.pattern.is_nm
        self.full = schedule == "reference" and unstructured_layer

    def __call__(self, iteration: int, candidate: torch.Tensor) -> torch.Tensor:
        if self.mask is None or iteration < self.ramp:
            sparsity = self.target.sparsity
            if not self.full:
                sparsity = cubic_sparsity(sparsity, iteration, self.ramp)
            scores = candidate.abs() * self.weights.unsqueeze(0)
            self.mask = relaxed_mask(scores, self.target, sparsity)
        return self.mask


@register
class AdmmGradual(LayerwiseMethod):
    name = "admm_gradual"
    summary = "ADMM weight update with the mask re-chosen while sparsity rises (Boža 2024)"
    needs = ("hessian",)
    default_scope = "layer"
    Config = AdmmGradualConfig

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        config = self.config
        problem = LayerProblem.build(weight_matrix(module), stats["hessian"], config.damp)
        if config.importance == "obs":
            weights = 1.0 / torch.diagonal(PenalisedInverse(problem.hessian)(0.0))
        else:
            weights = torch.ones_like(problem.scale)
        masks = GradualMasks(target, config.ramp, weights, config.schedule)
        result = run_admm(problem, masks, config.iterations, config.rho)
        set_weight_matrix(module, problem.restore(result.weight) * result.mask)
