"""What a pruning run records about itself (written as `prunekit.json`)."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.settings import VERSION


def versions() -> dict[str, str]:
    return {
        "prunekit": VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_zeros(adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    """(zero weights, weights) of each prunable linear, keyed `"block.path"` (counted when
    the block was written, for blocks streamed from disk)."""
    if adapter.offload is not None:
        return {
            f"{i}.{path}": count
            for i, per_block in sorted(adapter.offload.counts.items())
            for path, count in per_block.items()
        }
    out = {}
    for i, block in enumerate(adapter.blocks):
        for path, module in adapter.linears(block).items():
            w = weight_matrix(module)
            out[f"{i}.{path}"] = (int((w == 0).sum()), w.numel())
    return out


def layer_sparsity(adapter: ModelAdapter) -> dict[str, float]:
    """Share of zero weights in each prunable linear, keyed `"block.path"`."""
    return {k: round(z / max(n, 1), 6) for k, (z, n) in linear_zeros(adapter).items()}


def overall_sparsity(adapter: ModelAdapter) -> float:
    counts = linear_zeros(adapter).values()
    return sum(z for z, _ in counts) / max(sum(n for _, n in counts), 1)


@dataclass
class PruneRecord:
    """How a pruned model was made. `as_dict()` is the content of prunekit.json."""

    source_model: str
    method: str
    config: dict[str, Any]
    request: dict[str, Any]
    calibration: dict[str, Any] | None
    layer_sparsity: dict[str, float]
    overall_sparsity: float
    parameters_before: int
    parameters_after: int
    wall_time_s: float
    peak_rss_mb: float
    details: dict[str, Any] = field(default_factory=dict)
    outcome: str | None = None  # what --sparsity became, in one line (Method.outcome)
    update: dict[str, Any] | None = None  # weight update after the mask: {name, config}
    evaluation: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
