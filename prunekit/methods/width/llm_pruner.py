"""LLM-Pruner (Ma et al., NeurIPS 2023): Taylor importance of coupled structure groups.

Dependency groups: a KV group (its query heads' q rows, its k and v rows, the matching
o columns; GQA-aware, a KV head goes with its query heads) and an MLP channel (gate and
up rows, the down column). Importance is first order, from gradients G of the LM loss
(mean token cross-entropy) on the calibration windows:

- element-wise: each weight's |W·G|, summed over the structure's slice of a linear;
- vector-wise: |Σ W·G| over the structure's slice of a linear;

then aggregated over the group's linears by `aggregation` (sum, max, prod, or last =
the output projection only). Gradients are computed block by block
(`engine.gradients.blockwise_lm_gradients`: exact backpropagation with activation
checkpoints at block boundaries), so only one block's graph is ever held. All scores
come from the dense model; by default (`protect_first` / `protect_last` = -1) the first 4
and last 2 of every 32 blocks are left unpruned, as in the paper's LLaMA-7B setting
(blocks 4-29 of 32), scaled to the model's depth (30 blocks: 4 and 2; 5 blocks: 1 and 0),
and the others share the budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine.gradients import blockwise_lm_gradients
from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import PruneRequest, register
from prunekit.methods.width.base import BlockScores, StructuredConfig, StructuredMethod
from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.surgery.plan import ATTENTION, MLP, combine, linear_values, structure_sums

IMPORTANCE = ("element", "vector")
AGGREGATIONS = ("sum", "max", "prod", "last")


@dataclass
class LLMPrunerConfig(StructuredConfig):
    importance: str = "element"  # element: Σ|W·G|; vector: |Σ W·G| per linear slice
    aggregation: str = "sum"  # over the group's linears: sum, max, prod, last
    protect_first: int = -1  # -1: the reference's 4 of 32 blocks, scaled to the depth
    protect_last: int = -1  # -1: the reference's 2 of 32 blocks, scaled to the depth

    def protected_ends(self, num_blocks: int) -> tuple[int, int]:
        first, last = self.protect_first, self.protect_last
        scale = num_blocks / 32
        return (
            round(4 * scale) if first == -1 else first,
            round(2 * scale) if last == -1 else last,
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance not in IMPORTANCE:
            raise choice_error("importance", self.importance, IMPORTANCE)
        if self.aggregation not in AGGREGATIONS:
            raise choice_error("aggregation", self.aggregation, AGGREGATIONS)


def _grad_matrix(module: nn.Module) -> torch.Tensor:
    """The loss gradient of a linear's weight as [out, in] (transposed for Conv1D)."""
    weight = weight_matrix(module)
    grad = module.weight.grad
    return grad.t() if grad.shape != weight.shape else grad


def taylor_scores(
    adapter: ModelAdapter, block: nn.Module, importance: str, aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV group scores, MLP channel scores) from the gradients held in `block`."""

    def product(role: str, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        wg = weight.float() * _grad_matrix(module).float()
        return wg.abs() if importance == "element" else wg

    per_role = structure_sums(adapter, block, linear_values(adapter, block, product))
    if importance == "vector":
        per_role = {role: s.abs() for role, s in per_role.items()}
    per_role = {role: s.double() for role, s in per_role.items()}
    return combine(per_role, ATTENTION, aggregation), combine(per_role, MLP, aggregation)


@register
class LLMPruner(StructuredMethod):
    name = "llm_pruner"
    summary = "first-order Taylor importance |W·dL/dW| of coupled groups (GQA-aware)"
    Config = LLMPrunerConfig

    def block_scores(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest, dense: bool
    ) -> Iterator[tuple[int, nn.Module, BlockScores]]:
        config = self.config
        if calib is None:
            raise PrunekitError("method 'llm_pruner' needs calibration data")
        adapter = lm.adapter
        scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def on_block(index: int, block: nn.Module) -> None:
            scores[index] = taylor_scores(adapter, block, config.importance, config.aggregation)

        self.loss = blockwise_lm_gradients(
            adapter, calib, on_block, request.device, request.batch_size
        )
        for index, block in enumerate(adapter.blocks):
            groups, channels = scores[index]
            yield index, block, BlockScores(groups, channels, {})
