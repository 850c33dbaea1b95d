"""Sheared LLaMA (Xia et al., ICLR 2024, "Sheared LLaMA: Accelerating Language Model
Pre-training via Structured Pruning"): targeted structured pruning to a given shape by
learning hard-concrete masks under Lagrange multipliers (princeton-nlp/LLM-Shearing).

Loss: the language-modelling loss of the gated model plus, per constrained kind k, the
mean over blocks of λ₁ₖ·(ŝ − t) + λ₂ₖ·(ŝ − t)², where ŝ is the block's expected sparsity
of that kind (1 − expected kept / width) and t the target's (the reference's
`lagrangian_regularization` with a target architecture; for `layers`, one value). The
target sparsity rises linearly from 0 over the first `lagrangian_warmup` share of the
steps (its `lagrangian_warmup_steps`). The multipliers are maximised while the gates are
minimised (the reference steps them with a negated learning rate; here their gradient is
negated).
The model weights are trained with the masks (AdamW at `weights_lr` 1e-4, gates and
multipliers at `lr` 1.0: the reference's `lr` and `lag_lr`), and the gates start at the
reference's log-odds (its init 5, clamped to ln 100 before the first forward). Before
the cut, kept structures are scaled by their deterministic gate values, as the
reference's `prune_params` does (`fold_gates`). Its cosine
schedule with warm-up and Adam's β₂ = 0.95 are not reproduced (constant rates, β₂ 0.999).
Continued pre-training is a separate `prunekit heal` stage (e.g. in a recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.methods.base import register
from prunekit.methods.learned.base import LearnedConfig, LearnedMaskMethod, widest
from prunekit.methods.learned.hard_concrete import LOG_ALPHA_RANGE, ModelGates, keep_of


def expected_sparsities(gates: ModelGates) -> dict[str, torch.Tensor]:
    """Per kind, the expected sparsity of each block ([blocks]; layers, hidden: [1])."""
    counts = gates.expected_counts()
    widths = {k: torch.tensor(v, dtype=torch.float32) for k, v in gates.widths().items()}
    return {k: 1 - counts[k].reshape(-1) / widths[k] for k in widths}


def lagrangian(
    gates: ModelGates, target: dict[str, float], multipliers: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σₖ mean over blocks of λ₁ₖ·(ŝ − t) + λ₂ₖ·(ŝ − t)², with t = 1 − target count / width."""
    sparsities, full = expected_sparsities(gates), widest(gates)
    total = torch.zeros(())
    for kind, count in target.items():
        gap = sparsities[kind] - (1 - count / full[kind])
        lam = multipliers[kind]
        total = total + (lam[0] * gap + lam[1] * gap * gap).mean()
    return total


def warmed_target(
    full: dict[str, int], target: dict[str, int], step: int, warmup_steps: float
) -> dict[str, float]:
    """The target counts at `step`: from the full widths to `target` linearly over
    `warmup_steps` steps (then the target)."""
    share = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return {k: full[k] - (full[k] - v) * share for k, v in target.items()}


@dataclass
class ShearedConfig(LearnedConfig):
    lagrangian_warmup: float = 0.2  # share of the steps over which the target rises
    lr: float = 1.0  # gates and multipliers (the reference's lag_lr)
    weights_lr: float = 1e-4  # the model's weights (the reference's lr)
    init_keep: float = keep_of(LOG_ALPHA_RANGE[1])
    fold_gates: bool = True  # the reference scales kept structures by their soft gates

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.lagrangian_warmup <= 1:
            raise PrunekitError("lagrangian_warmup must be in [0, 1]")


@register
class ShearedLlama(LearnedMaskMethod):
    name = "sheared_llama"
    summary = "hard-concrete masks trained to a target shape under Lagrange multipliers"
    Config = ShearedConfig

    def setup(self, gates: ModelGates, target: dict[str, int]) -> dict[str, nn.Parameter]:
        self.full = widest(gates)
        self.multipliers = {}
        for kind in target:
            lam = nn.Parameter(torch.zeros(2))
            lam.register_hook(torch.neg)  # gradient ascent on λ
            self.multipliers[kind] = lam
        return {f"lambda.{k}": v for k, v in self.multipliers.items()}

    def warmup_steps(self) -> float:
        return self.config.lagrangian_warmup * self.config.steps

    def constraint(self, gates: ModelGates, target: dict[str, int], step: int) -> torch.Tensor:
        current = warmed_target(self.full, target, step, self.warmup_steps())
        return lagrangian(gates, current, self.multipliers)
