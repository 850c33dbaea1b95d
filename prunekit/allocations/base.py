"""Allocation: how a mean sparsity is spread over the blocks (an axis of its own).

An allocation is named by a spec string `NAME[:ARGUMENT]`, e.g. `uniform`,
`owl:m=5,lam=0.08` or `file:ratios.json`. Each one is a class in its own module of
`prunekit/allocations/` decorated by `@register_allocation`.
`Allocation.allocate` returns one sparsity per block (or None for uniform) plus facts
to record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.base import PruneRequest
from prunekit.models.loading import LoadedModel
from prunekit.options import Options, parse_pairs
from prunekit.registry import Registry


@dataclass
class AllocationConfig(Options):
    """Options of an allocation; subclasses add typed fields."""


@dataclass
class Allocated:
    """Per-block sparsities (None = every block at the mean) and facts to record."""

    ratios: list[float] | None
    details: dict[str, Any] = field(default_factory=dict)


class Allocation:
    """Spreads `request.sparsity` over the blocks of `lm`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[AllocationConfig]] = AllocationConfig
    needs_calibration: ClassVar[bool] = False
    aliases: ClassVar[dict[str, str]] = {}  # option spellings accepted besides field names

    def __init__(self, config: AllocationConfig | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_argument(cls, argument: str) -> Allocation:
        """Build from the text after `NAME:` (default: `key=value,...` options)."""
        pairs = parse_pairs(argument)
        options = {cls.aliases.get(k.lower(), k.lower()): v for k, v in pairs.items()}
        return cls(cls.Config.from_options(options))

    @property
    def spec(self) -> str:
        """The spec string that rebuilds this allocation."""
        options = ",".join(f"{k}={v}" for k, v in asdict(self.config).items())
        return f"{self.name}:{options}" if options else self.name

    def allocate(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest
    ) -> Allocated:
        raise NotImplementedError


ALLOCATIONS: Registry[type[Allocation]] = Registry("allocation")
register_allocation = ALLOCATIONS.register


def get_allocation(spec: str | Allocation) -> Allocation:
    """The Allocation a spec string names (`uniform`, `owl:m=5`, `file:PATH`)."""
    if isinstance(spec, Allocation):
        return spec
    name, _, argument = spec.partition(":")
    return ALLOCATIONS.lookup(name).from_argument(argument)


def describe(ratios: list[float] | None, sparsity: float) -> dict[str, Any]:
    """Summary of per-block ratios for the record: the ratios, their mean, min and max."""
    values = ratios if ratios is not None else [sparsity]
    return {
        "ratios": None if ratios is None else [round(r, 8) for r in ratios],
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
    }


def allocate(
    spec: str | Allocation, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest
) -> Allocated:
    """Per-block sparsities for `request` (checked: one per block, each in [0, 1))."""
    allocation = get_allocation(spec)
    result = allocation.allocate(lm, calib, request)
    if result.ratios is not None:
        blocks = lm.adapter.num_layers
        if len(result.ratios) != blocks:
            raise PrunekitError(
                f"allocation {allocation.name} gave {len(result.ratios)} ratios "
                f"for a model with {blocks} blocks"
            )
        bad = [r for r in result.ratios if not 0.0 <= r < 1.0]
        if bad:
            raise PrunekitError(f"allocation {allocation.name} gave ratios outside [0, 1): {bad}")
    result.details = {
        "spec": allocation.spec,
        **describe(result.ratios, request.sparsity),
        **result.details,
    }
    return result
