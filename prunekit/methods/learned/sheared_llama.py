"""Sheared LLaMA (Xia et al., ICLR 2024, "Sheared LLaMA: Accelerating Language Model
Pre-training via Structured Pruning"): targeted structured pruning to a given shape by
learning hard-concrete masks under Lagrange multipliers (princeton-nlp/LLM-Shearing).

Loss: the language-modelling loss of the gated model plus, per constrained kind k,
λ₁ₖ·(Eₖ − Tₖ) + λ₂ₖ·(Eₖ − Tₖ)², where Eₖ is the expected kept count (summed over blocks)
and Tₖ the target's. The multipliers are maximised while the gates are minimised (the
reference steps them with a negated learning rate; here their gradient is negated).
Continued pre-training is a separate `prunekit heal` stage (e.g. in a recipe).
Hidden-dimension masks are not learned here.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.methods.base import register
from prunekit.methods.learned.base import LearnedMaskMethod, goal
from prunekit.methods.learned.hard_concrete import ModelGates


def lagrangian(
    gates: ModelGates, target: dict[str, float], multipliers: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σₖ λ₁ₖ·(Eₖ − Tₖ) + λ₂ₖ·(Eₖ − Tₖ)² over the constrained kinds (totals over blocks)."""
    counts, blocks = gates.expected_counts(), len(gates.kv)
    total = torch.zeros(())
    for kind, count in target.items():
        gap = counts[kind].sum() - goal(kind, count, blocks)
        lam = multipliers[kind]
        total = total + lam[0] * gap + lam[1] * gap * gap
    return total


@register
class ShearedLlama(LearnedMaskMethod):
    name = "sheared_llama"
    summary = "hard-concrete masks trained to a target shape under Lagrange multipliers"

    def setup(self, gates: ModelGates, target: dict[str, int]) -> dict[str, nn.Parameter]:
        self.multipliers = {}
        for kind in target:
            lam = nn.Parameter(torch.zeros(2))
            lam.register_hook(torch.neg)  # gradient ascent on λ
            self.multipliers[kind] = lam
        return {f"lambda.{k}": v for k, v in self.multipliers.items()}

    def constraint(self, gates: ModelGates, target: dict[str, int], step: int) -> torch.Tensor:
        return lagrangian(gates, target, self.multipliers)
