"""Method base classes and the registry.

A method is one file in `prunekit/methods/` with a class decorated by `@register`:

- `Method`: the most general form; `run(lm, calib, request)` may do anything (structured
  and depth methods).
- `LayerwiseMethod`: the sequential engine drives it block by block; it implements
  `prune_block` or, more often, `prune_linear`.
- `ScoreMethod`: a LayerwiseMethod whose mask comes from an importance score per weight
  (magnitude, Wanda, RIA ...); it implements only `score`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

import torch
from torch import nn

from prunekit.engine.runner import BlockContext, LayerStats, SequentialRunner
from prunekit.errors import PrunekitError, choice_error
from prunekit.masks import Pattern, Target, make_mask
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel


@dataclass
class MethodConfig:
    """Options of a method beyond the common ones; subclasses add typed fields."""

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MethodConfig:
        """Build from `{name: value}` (values may be strings from the CLI), checking names."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        values = {}
        for key, raw in options.items():
            if key not in fields:
                valid = ", ".join(fields) or "(none)"
                raise PrunekitError(f"unknown option {key!r}; valid: {valid}")
            values[key] = _coerce(key, raw, hints[key])
        return cls(**values)


def _coerce(key: str, raw: Any, hint: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = hint if isinstance(hint, type) else None
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise PrunekitError(f"option {key!r} needs a {kind.__name__}, got {raw!r}") from None
    return raw


@dataclass
class PruneRequest:
    """The common part of a pruning run, shared by every method.

    `sparsity` is the mean target (share of weights zeroed, or of structure removed);
    `layer_sparsity` optionally gives one ratio per block (allocation). `propagate` says
    whether block i+1 is calibrated on the pruned ("pruned", as the papers do) or the dense
    ("dense", one pass per block) outputs of block i.
    """

    sparsity: float
    pattern: Pattern = field(default_factory=Pattern)
    scope: str = "row"
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0
    propagate: str = "pruned"
    layer_sparsity: list[float] | None = None

    def target(self, block_index: int) -> Target:
        ratio = self.layer_sparsity[block_index] if self.layer_sparsity else self.sparsity
        if self.pattern.is_nm:
            ratio = self.pattern.sparsity
        return Target(ratio, self.pattern, self.scope)


class Method:
    """A pruning method: `run` changes `lm.model` in place and returns facts to record."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[str] = "unstructured"  # unstructured | structured | depth | lowrank
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_calibration: ClassVar[bool] = True
    supports_nm: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        """Prune `lm` with calibration windows `calib` [n, L]; return extra facts to record."""
        raise NotImplementedError


class LayerwiseMethod(Method):
    """Driven block by block by the sequential engine; statistics named in `needs`."""

    needs: ClassVar[tuple[str, ...]] = ()

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        if calib is None:  # data-free: walk the blocks without activations
            for index, block in enumerate(lm.adapter.blocks):
                for path, module in lm.adapter.linears(block).items():
                    self.prune_linear(module, {}, request.target(index), path)
            return {}
        runner = SequentialRunner(
            lm.adapter,
            calib,
            device=request.device,
            batch_size=request.batch_size,
            propagate=request.propagate,
            collect=self.needs,
        )
        for ctx in runner:
            self.prune_block(ctx, ctx.stats, request.target(ctx.index))
        return {}

    def prune_block(self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target) -> None:
        """Prune every linear of the block; override for block-level dependencies."""
        for path, module in ctx.linears().items():
            self.prune_linear(module, stats.get(path, {}), target, path)

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        raise NotImplementedError


class ScoreMethod(LayerwiseMethod):
    """Mask = the highest `score` per row / layer / N:M group; weights are only zeroed."""

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """Importance of each weight, [out, in] (higher = keep)."""
        raise NotImplementedError

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        weight = weight_matrix(module)
        weight.mul_(make_mask(self.score(weight.float(), stats), target))


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise choice_error("method", name, sorted(REGISTRY))
    return REGISTRY[name]
