"""Uniform allocation: every block at the mean sparsity."""

from __future__ import annotations

import torch

from prunekit.allocations.base import Allocated, Allocation, register_allocation
from prunekit.methods.base import PruneRequest
from prunekit.models.loading import LoadedModel


@register_allocation
class Uniform(Allocation):
    name = "uniform"
    summary = "every block at the mean sparsity"

    def allocate(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest
    ) -> Allocated:
        return Allocated(None)
