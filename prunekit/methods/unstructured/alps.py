"""ALPS (Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for
Large Language Models", 2024), as mazumder-lab/ALPS `ALPS_admm` does it.

In the normalised space (H + 0.01·mean(diag H)·I, columns scaled by √diag + 1e-8):
    B ← (H + ρI)⁻¹ (W₀H − V + ρD)ᵀ       primal
    D ← top-k of |B + V/ρ| (layer scope, or N:M), the rest zeroed
    V ← V + ρ(B − D)                      (unscaled) dual
Every 3 iterations the share of the k kept positions that changed sets ρ: ×1.3 above
10%, ×1.2 above 0.5%; with fewer changes ×1.1 once ρ has risen, otherwise ρ/5 and a
restart from W₀; with no change the run stops once ρ has risen (else ρ/5). The run also
stops after 30 iterations when under 0.03% changed. ρ is capped at 1e6. The final support
is the top-k of the primal B; 10 conjugate-gradient steps on that support (identity
preconditioner, the reference's residual test) refit the kept weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine.distributed import gather_objects
from prunekit.engine.runner import LayerStats
from prunekit.errors import PrunekitError
from prunekit.methods.base import MethodConfig, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod
from prunekit.methods.unstructured.updates.admm_core import (
    LayerProblem,
    PenalisedInverse,
    check_penalty,
)
from prunekit.methods.unstructured.updates.base import WeightUpdate
from prunekit.models.adapter import set_weight_matrix, weight_matrix
from prunekit.surgery.masks import Target, make_mask


@dataclass
class AlpsConfig(MethodConfig):
    max_iterations: int = 300  # ADMM iterations at most
    min_iterations: int = 30  # the stable-support stop applies from here (switch_iter)
    stable_share: float = 0.0003  # stop when fewer than this share of kept positions changed
    rho: float = 0.1  # initial penalty ρ
    check_every: int = 3  # iterations between support checks / ρ updates
    cg_iterations: int = 10  # conjugate-gradient steps on the final support
    cg_rtol: float = 1e-4  # CG stops when every column's residual is below rtol·‖target‖
    damp: float = 0.01  # times mean(diag H), added before normalising

    def __post_init__(self) -> None:
        if self.max_iterations < 1 or self.check_every < 1 or self.cg_iterations < 0:
            raise PrunekitError("alps needs max_iterations >= 1, check_every >= 1, cg >= 0")
        check_penalty("alps", self.rho, self.damp)


@dataclass
class AlpsResult:
    weight: torch.Tensor  # normalised [out, in], zero outside `mask`
    mask: torch.Tensor
    iterations: int


def alps_admm(problem: LayerProblem, project, config: AlpsConfig) -> AlpsResult:
    """The reference's ADMM loop; `project(x)` is the kept mask of x's magnitudes."""
    inverse = PenalisedInverse(problem.hessian)
    rho = config.rho
    first = project(problem.dense)
    d_init = problem.dense * first
    d, v = d_init.clone(), torch.zeros_like(d_init)
    checked, kept = d_init != 0, int(first.sum())
    rose = False
    b = problem.dense
    done = 0
    for it in range(config.max_iterations):
        done = it + 1
        b = (problem.target - v + rho * d) @ inverse(rho)
        candidate = b + v / rho
        mask = project(candidate)
        d = candidate * mask
        v = v + rho * (b - d)
        if done % config.check_every:
            continue
        support = d != 0
        changes = int((support != checked).sum())
        share = changes / max(kept, 1)
        if share > 0.1:
            rose, rho = True, rho * 1.3
        elif share > 0.005:
            rose, rho = True, rho * 1.2
        elif changes > 0:
            if rose:
                rho *= 1.1
            else:
                rho /= 5
                b, d, v = problem.dense, d_init.clone(), torch.zeros_like(d_init)
        elif rose:
            break
        else:
            rho /= 5
        checked = support
        rho = min(rho, 1e6)
        if it >= config.min_iterations and share < config.stable_share:
            break
    final = project(b)
    return AlpsResult(b * final, final, done)


def support_cg(
    problem: LayerProblem, mask: torch.Tensor, start: torch.Tensor, iterations: int, rtol: float
) -> torch.Tensor:
    """CG for H_SS w_S = (W₀H)_S per row from `start` (identity preconditioner); stops when
    every input column's full residual ‖(WH − W₀H)[:, j]‖ ≤ rtol·‖(W₀H)[:, j]‖."""
    h, keep = problem.hessian, mask.to(problem.hessian.dtype)
    limit = rtol * problem.target.norm(dim=0)
    w = start * keep
    r = (problem.target - w @ h) * keep
    p, rr = r, (r * r).sum(1)
    for step in range(iterations):
        if step:
            rr_next = (r * r).sum(1)
            p = r + (rr_next / torch.where(rr == 0, 1e-8, rr)).unsqueeze(1) * p
            rr = rr_next
        hp = p @ h
        curvature = (p * hp).sum(1)
        alpha = rr / torch.where(curvature == 0, 1e-8, curvature)
        w = w + alpha.unsqueeze(1) * p
        r = (r - alpha.unsqueeze(1) * hp) * keep
        if bool(((w @ h - problem.target).norm(dim=0) <= limit).all()):
            break
    return w


@register
class Alps(LayerwiseMethod):
    name = "alps"
    summary = "ADMM mask + weights with a support-driven rho schedule, CG refit (Meng 2024)"
    needs = ("hessian",)
    default_scope = "layer"
    Config = AlpsConfig

    def __init__(self, config: AlpsConfig | None = None, update: WeightUpdate | None = None):
        super().__init__(config, update)
        self.iterations: list[int] = []  # ADMM iterations per pruned linear

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        config = self.config
        problem = LayerProblem.build_damped_first(
            weight_matrix(module), stats["hessian"], config.damp
        )
        result = alps_admm(problem, lambda x: make_mask(x.abs(), target), config)
        refit = support_cg(
            problem, result.mask, result.weight, config.cg_iterations, config.cg_rtol
        )
        set_weight_matrix(module, problem.restore(refit) * result.mask)
        self.iterations.append(result.iterations)

    def merge_rank_facts(self) -> None:
        self.iterations = [n for part in gather_objects(self.iterations) for n in part]

    def details(self) -> dict:
        if not self.iterations:
            return {}
        mean = sum(self.iterations) / len(self.iterations)
        return {"alps": {"mean_admm_iterations": mean, "layers": len(self.iterations)}}
