"""LLM-Pruner (Ma et al., NeurIPS 2023): Taylor importance of coupled structure groups.

Dependency groups: a KV group (its query heads' q rows, its k and v rows, the matching
o columns; GQA-aware, a KV head goes with its query heads) and an MLP channel (gate and
up rows, the down column). As in the reference (`LLMPruner/pruner/hf_llama_pruner.py`,
`TaylorImportance`), each weight gets a salience from the gradient G of the LM loss (mean
token cross-entropy over the calibration windows) and, for the second-order terms, the
diagonal Fisher F = mean over windows of g_w², g_w the gradient of window w's loss:

- order=first  (`param_first`, the reference default):  s = W·G
- order=second (`param_second`):                        s = W·F·W
- order=mix    (`param_mix`):                           s = W·G − ½·W·F·W

Each linear's salience is reduced per channel it contributes (rows of q/k/v/gate/up,
columns of o/down): Σ|s| (importance=element) or |Σ s| (importance=vector, the
reference's `vectorize`). The group's linears are then aggregated channel by channel
(sum, max, prod, or last = the output projection only) and, for attention, summed over
the head's head_dim channels (the reference's order: reduce over the group, then over
consecutive channels). With GQA the query heads of a KV group are summed onto its
channels. Gradients are computed block by block (`engine.gradients.
blockwise_lm_gradients`), so only one block's graph is ever held; second-order orders run
it once more per calibration window. All scores come from the dense model; by default
(`protect_first` / `protect_last` = -1) the first 4 and last 2 of every 32 blocks are left
unpruned, as in the paper's LLaMA-7B setting (blocks 4-29 of 32), scaled to the model's
depth (30 blocks: 4 and 2; 5 blocks: 1 and 0), and the others share the budget. The
number of removed KV groups is floored, as the reference floors pruned heads.
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
from prunekit.surgery.plan import ATTENTION, MLP, channel_lines, combine, structure_ids

IMPORTANCE = ("element", "vector")
ORDERS = ("first", "second", "mix")
AGGREGATIONS = ("sum", "max", "prod", "last")


@dataclass
class LLMPrunerConfig(StructuredConfig):
    importance: str = "element"  # per channel: element Σ|s|, vector |Σ s|
    order: str = "first"  # salience s: first W·G, second W·F·W, mix W·G - W·F·W/2
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
        if self.order not in ORDERS:
            raise choice_error("order", self.order, ORDERS)
        if self.aggregation not in AGGREGATIONS:
            raise choice_error("aggregation", self.aggregation, AGGREGATIONS)


def _as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of `module` as [out, in] (transposed for Conv1D)."""
    return tensor.t() if tensor.shape != weight_matrix(module).shape else tensor


def salience(
    weight: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, order: str
) -> torch.Tensor:
    """Per-weight Taylor salience [out, in] (float32) of the given order."""
    w = weight.float()
    if order == "first":
        return w * grad.float()
    second = w * fisher.float() * w
    return second if order == "second" else w * grad.float() - 0.5 * second


def taylor_scores(
    adapter: ModelAdapter,
    block: nn.Module,
    config: LLMPrunerConfig,
    fisher: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV group scores [kv_heads], MLP channel scores [intermediate]) from the gradients
    held in `block` and, for second-order saliences, its Fisher diagonals by role."""
    where = structure_ids(adapter, block)
    lines = {}
    for role in adapter.spec.linears:
        module = adapter.linear(block, role)
        grad = _as_matrix(module, module.weight.grad)
        s = salience(weight_matrix(module), grad, None if fisher is None else fisher[role],
                     config.order)  # fmt: skip
        along = 1 - where[role].axis  # reduce the other axis: one value per row or column
        lines[role] = s.abs().sum(along) if config.importance == "element" else s.sum(along).abs()
    per_channel = channel_lines(adapter, block, lines)
    per_channel = {role: v.double() for role, v in per_channel.items()}
    how = config.aggregation
    return combine(per_channel, ATTENTION, how).sum(1), combine(per_channel, MLP, how).sum(1)


def fisher_diagonals(
    adapter: ModelAdapter, calib: torch.Tensor, device: str, batch_size: int
) -> dict[int, dict[str, torch.Tensor]]:
    """Per block and role, the mean over windows of the squared gradient of each window's
    loss (the reference's `acc_grad`), as [out, in] float32."""
    fisher: dict[int, dict[str, torch.Tensor]] = {}
    n = calib.shape[0]

    def accumulate(index: int, block: nn.Module) -> None:
        into = fisher.setdefault(index, {})
        for role in adapter.spec.linears:
            module = adapter.linear(block, role)
            g2 = _as_matrix(module, module.weight.grad).float().square() / n
            into[role] = into[role] + g2 if role in into else g2

    for w in range(n):
        blockwise_lm_gradients(adapter, calib[w : w + 1], accumulate, device, batch_size)
    return fisher


@register
class LLMPruner(StructuredMethod):
    name = "llm_pruner"
    summary = "Taylor importance (first/second order) of coupled groups (GQA-aware)"
    Config = LLMPrunerConfig
    floor_groups = True  # the reference floors the number of pruned heads
    compute_dtypes = False  # its gradients are float32
    distributes = False  # its gradients come from the whole batch on one process
    streams = False  # its gradients need the whole model

    def block_scores(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest, dense: bool
    ) -> Iterator[tuple[int, nn.Module, BlockScores]]:
        config = self.config
        if calib is None:
            raise PrunekitError("method 'llm_pruner' needs calibration data")
        adapter = lm.adapter
        scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        fisher = None
        if config.order != "first":
            fisher = fisher_diagonals(adapter, calib, request.device, request.batch_size)

        def on_block(index: int, block: nn.Module) -> None:
            scores[index] = taylor_scores(
                adapter, block, config, None if fisher is None else fisher.pop(index)
            )

        self.loss = blockwise_lm_gradients(
            adapter, calib, on_block, request.device, request.batch_size
        )
        for index, block in enumerate(adapter.blocks):
            groups, channels = scores[index]
            yield index, block, BlockScores(groups, channels, {})
