"""Allocation: how a mean sparsity is spread over the blocks (an axis of its own).

An allocation returns one ratio per block whose mean is the target, or None for uniform.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from prunekit.errors import choice_error
from prunekit.methods.base import PruneRequest
from prunekit.models.loading import LoadedModel

Allocator = Callable[[LoadedModel, "torch.Tensor | None", PruneRequest], "list[float] | None"]

ALLOCATIONS: dict[str, Allocator] = {}


def register_allocation(name: str) -> Callable[[Allocator], Allocator]:
    def wrap(fn: Allocator) -> Allocator:
        ALLOCATIONS[name] = fn
        return fn

    return wrap


@register_allocation("uniform")
def uniform(lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> None:
    """Every block at the mean sparsity."""
    return None


def allocate(
    name: str, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest
) -> list[float] | None:
    if name not in ALLOCATIONS:
        raise choice_error("allocation", name, ALLOCATIONS)
    return ALLOCATIONS[name](lm, calib, request)
