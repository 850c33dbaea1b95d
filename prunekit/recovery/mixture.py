"""Sheared LLaMA's dynamic batch loading (Xia et al., 2024): when training on several text
sources, every `every` steps the share of each source in the batches is multiplied by
exp(max(loss − reference loss, 0)) and renormalised, so the sources the model is furthest
behind on get more of the next batches.

Losses are mean token NLL on a few held-out windows per source; the reference losses are
given or measured on the dense model. The state (weights, cursors, generator) goes into
the training checkpoint, so a resumed run draws the same batches.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.eval.perplexity import mean_nll


class DynamicMixture:
    """Batches [batch_size, L] drawn from `pools` (one [n, L] tensor per source)."""

    def __init__(
        self,
        pools: list[torch.Tensor],
        held_out: list[torch.Tensor],
        reference: list[float],
        batch_size: int,
        every: int,
        seed: int,
    ):
        self.pools, self.held_out, self.reference = pools, held_out, reference
        self.batch_size, self.every = batch_size, every
        self.weights = torch.full((len(pools),), 1.0 / len(pools), dtype=torch.float64)
        self.cursors = [0] * len(pools)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[list[float]] = [self.weights.tolist()]

    def batch(self) -> torch.Tensor:
        """The next batch: each window's source drawn by the current weights."""
        sources = torch.multinomial(
            self.weights, self.batch_size, replacement=True, generator=self.generator
        )
        rows = []
        for source in sources.tolist():
            pool = self.pools[source]
            rows.append(pool[self.cursors[source] % pool.shape[0]])
            self.cursors[source] += 1
        return torch.stack(rows)

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int) -> list[float]:
        """Re-weight the sources by their loss gap; returns the losses (nats/token)."""
        was_training = model.training
        model.eval()
        losses = [mean_nll(model, held, batch_size) for held in self.held_out]
        model.train(was_training)
        gap = torch.tensor(losses, dtype=torch.float64) - torch.tensor(self.reference)
        self.weights = self.weights * gap.clamp_min(0).exp()
        self.weights /= self.weights.sum()
        self.history.append(self.weights.tolist())
        return losses

    def state(self) -> dict:
        return {
            "weights": self.weights.clone(),
            "cursors": list(self.cursors),
            "generator": self.generator.get_state(),
            "history": [list(h) for h in self.history],
        }

    def restore(self, state: dict) -> None:
        self.weights = state["weights"].clone()
        self.cursors = list(state["cursors"])
        self.generator.set_state(state["generator"])
        self.history = [list(h) for h in state["history"]]
