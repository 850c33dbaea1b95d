"""Weight updates: after a mask method has chosen which weights of a linear to zero,
re-fit the kept weights so the layer's output on the calibration inputs changes least.

An update solves  min_Ŵ ‖W X − Ŵ X‖²  subject to Ŵ being zero outside the mask, using
H = XᵀX (the `hessian` collector). It never revives a pruned weight: the mask is the
pruned layer's nonzero pattern, and the result is multiplied by it.
Updates are registered by name (`@register_update`) in their own module of this package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.engine.runner import LayerStats
from prunekit.methods.base import MethodConfig
from prunekit.models.adapter import set_weight_matrix, weight_matrix
from prunekit.registry import Registry


@dataclass
class UpdateConfig(MethodConfig):
    """Options of a weight update; subclasses add typed fields (CLI: `--update-opt k=v`)."""


def reconstruction_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖ΔW X‖² per calibration token up to H's scale: trace(ΔW H ΔWᵀ); ΔW [out, in], H [in, in]."""
    delta = delta.float()
    return float(((delta @ hessian.float()) * delta).sum())


class WeightUpdate:
    """Re-fits the kept weights of one linear given its dense weight and input statistics."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[UpdateConfig]] = UpdateConfig
    needs: ClassVar[tuple[str, ...]] = ("hessian",)

    def __init__(self, config: UpdateConfig | None = None):
        self.config = config if config is not None else self.Config()

    def describe(self) -> dict[str, Any]:
        """Name and options, as recorded in prunekit.json."""
        return {"name": self.name, "config": dataclasses.asdict(self.config)}

    def solve(self, dense: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """New weights [out, in] (float32) for `dense` [out, in] kept where `mask` is True."""
        raise NotImplementedError

    def apply(self, module: nn.Module, dense: torch.Tensor, stats: LayerStats) -> dict[str, float]:
        """Update `module` in place; its current zeros are the mask. Returns the relative
        reconstruction error trace(ΔW H ΔWᵀ) / trace(W H Wᵀ) before and after."""
        pruned = weight_matrix(module).clone()
        mask = pruned != 0
        dense = dense.float()
        new = self.solve(dense, mask, stats) * mask
        set_weight_matrix(module, new)
        hessian = stats["hessian"]
        scale = max(reconstruction_error(dense, hessian), 1e-30)
        return {
            "before": reconstruction_error(pruned.float() - dense, hessian) / scale,
            "after": reconstruction_error(new - dense, hessian) / scale,
        }


UPDATES: Registry[type[WeightUpdate]] = Registry("update", extra_valid=("none",))
register_update = UPDATES.register
get_update = UPDATES.lookup
