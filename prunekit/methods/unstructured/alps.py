"""ALPS (Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for
Large Language Models", 2024): the mask and the weights come from one ADMM run whose
projection keeps the most important entries of W + U under the target pattern (row,
layer or N:M; importance |W|·‖X_j‖ in the normalised space). ρ starts small and rises as
the support stabilises (×1.3 / 1.2 / 1.1 every 3 iterations); the run stops when the
support stops changing. A preconditioned conjugate-gradient solve of the least-squares
problem on the final support then polishes the kept weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunekit.engine.runner import LayerStats
from prunekit.errors import PrunekitError
from prunekit.methods.base import MethodConfig, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod
from prunekit.methods.unstructured.updates.admm_core import (
    LayerProblem,
    check_penalty,
    pcg_on_support,
    run_admm,
    support_adaptive_rho,
)
from prunekit.methods.unstructured.updates.base import WeightUpdate
from prunekit.models.adapter import set_weight_matrix, weight_matrix
from prunekit.surgery.masks import Target, make_mask


@dataclass
class AlpsConfig(MethodConfig):
    max_iterations: int = 300  # ADMM iterations at most (ALPS's default)
    min_iterations: int = 30  # no early stop before this many
    stable_share: float = 0.0003  # stop when fewer support positions changed in a check
    rho: float = 0.1  # initial penalty ρ (relative to the normalised H's unit diagonal)
    check_every: int = 3  # iterations between support checks / ρ updates
    pcg_iterations: int = 50  # conjugate-gradient iterations on the final support
    damp: float = 0.01  # ridge added to the normalised H

    def __post_init__(self) -> None:
        if self.max_iterations < 1 or self.check_every < 1 or self.pcg_iterations < 0:
            raise PrunekitError("alps needs max_iterations >= 1, check_every >= 1, pcg >= 0")
        check_penalty("alps", self.rho, self.damp)


@register
class Alps(LayerwiseMethod):
    name = "alps"
    summary = "ADMM mask + weights with a support-driven rho schedule, PCG polish (Meng 2024)"
    needs = ("hessian",)
    Config = AlpsConfig

    def __init__(self, config: AlpsConfig | None = None, update: WeightUpdate | None = None):
        super().__init__(config, update)
        self.iterations: list[int] = []  # ADMM iterations per pruned linear

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        config = self.config
        problem = LayerProblem.build(weight_matrix(module), stats["hessian"], config.damp)
        kept = int(make_mask(problem.dense.abs(), target).sum())
        result = run_admm(
            problem,
            lambda it, candidate: make_mask(candidate.abs(), target),
            config.max_iterations,
            config.rho,
            support_adaptive_rho(kept),
            check_every=config.check_every,
            stop_after=config.min_iterations,
            stable_changes=int(config.stable_share * kept),
        )
        polished, _ = pcg_on_support(problem, result.mask, result.weight, config.pcg_iterations)
        set_weight_matrix(module, problem.restore(polished) * result.mask)
        self.iterations.append(result.iterations)

    def details(self) -> dict:
        if not self.iterations:
            return {}
        return {"alps": {"mean_admm_iterations": sum(self.iterations) / len(self.iterations)}}
