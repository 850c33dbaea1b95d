"""ALPS's weight update for a given mask (Meng et al., "ALPS: Improved Optimization for
Highly Sparse One-Shot Pruning for Large Language Models", 2024): ADMM with ALPS's
increasing ρ as a warm start, then a preconditioned conjugate-gradient solve of the
least-squares problem on the (fixed) support. The `alps` method also chooses the mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.engine.runner import LayerStats
from prunekit.errors import PrunekitError
from prunekit.methods.unstructured.updates.admm_core import (
    LayerProblem,
    check_penalty,
    pcg_on_support,
    run_admm,
    support_adaptive_rho,
)
from prunekit.methods.unstructured.updates.base import UpdateConfig, WeightUpdate, register_update


@dataclass
class AlpsUpdateConfig(UpdateConfig):
    iterations: int = 10  # ADMM warm-start iterations
    rho: float = 0.1  # initial penalty ρ (ALPS's default), raised every 3 iterations
    pcg_iterations: int = 50  # conjugate-gradient iterations on the support
    damp: float = 0.01  # ridge added to the normalised H

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.pcg_iterations < 0:
            raise PrunekitError("alps iterations and pcg_iterations must be >= 0")
        check_penalty("alps", self.rho, self.damp)


def alps_refit(problem: LayerProblem, mask: torch.Tensor, config: AlpsUpdateConfig) -> torch.Tensor:
    """ADMM warm start on a fixed `mask`, then PCG on it; normalised weights [out, in]."""
    start = problem.dense * mask
    if config.iterations:
        rule = support_adaptive_rho(int(mask.sum()))
        start = run_admm(problem, lambda it, w: mask, config.iterations, config.rho, rule).weight
    weight, _ = pcg_on_support(problem, mask, start, config.pcg_iterations)
    return weight


@register_update
class AlpsUpdate(WeightUpdate):
    name = "alps"
    summary = "ALPS: ADMM with rising rho, then PCG least squares on the support, mask fixed"
    Config = AlpsUpdateConfig

    def solve(self, dense: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        problem = LayerProblem.build(dense, stats["hessian"], self.config.damp)
        return problem.restore(alps_refit(problem, mask, self.config))
