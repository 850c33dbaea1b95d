"""ADMM weight update (Boža, "Fast and Effective Weight Update for Pruned Large Language
Models", 2024): for a fixed mask, ADMM on min ‖WX − ŴX‖² with one factorisation of
H + ρI, projection onto the mask and a dual step (see `admm_core`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.engine.runner import LayerStats
from prunekit.errors import PrunekitError
from prunekit.methods.unstructured.updates.admm_core import LayerProblem, check_penalty, run_admm
from prunekit.methods.unstructured.updates.base import UpdateConfig, WeightUpdate, register_update


@dataclass
class AdmmConfig(UpdateConfig):
    iterations: int = 20  # ADMM iterations (the paper's default)
    rho: float = 1.0  # penalty ρ, relative to the unit diagonal of the normalised H
    damp: float = 0.1  # ridge added to the normalised H (the paper's code uses 0.1)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise PrunekitError(f"admm iterations must be at least 1, got {self.iterations}")
        check_penalty("admm", self.rho, self.damp)


@register_update
class AdmmUpdate(WeightUpdate):
    name = "admm"
    summary = "ADMM re-fit of the kept weights (Boža 2024), mask fixed"
    Config = AdmmConfig

    def solve(self, dense: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        problem = LayerProblem.build(dense, stats["hessian"], self.config.damp)
        result = run_admm(problem, lambda it, w: mask, self.config.iterations, self.config.rho)
        return problem.restore(result.weight)
