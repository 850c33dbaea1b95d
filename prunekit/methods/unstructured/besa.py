"""BESA (Xu et al., ICLR 2024, "BESA: Pruning Large Language Models with Blockwise
Parameter-Efficient Sparsity Allocation"): each block learns how sparse each of its
linears (or each row) should be by minimising the block's reconstruction error.

Per linear, the weights of every row are ranked by Wanda importance |W_ij|·‖X_j‖. A group
(the whole layer, or one row) holds a softmax β over D candidate ratios p_d; under p_d the
row drops its p_d·in least important weights, so a weight of rank r is kept with
probability Σ_{d: p_d ≤ r/in} β_d and the group's sparsity is s = Σ_d β_d p_d. The forward
pass uses the hard mask "drop the round(s·in) least important" with the soft keep
probabilities' gradient (straight-through). The loss is
    ‖block(X) − dense_block(X)‖² / ‖dense_block(X)‖²  +  λ · (mean sparsity − target)²
(mean over the block's weights), trained with Adam for a few epochs on the block's
calibration inputs; the dense outputs are computed before the block changes. A final
rounding gives every block exactly round(target · its weights) zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine.runner import BlockContext, LayerStats
from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import MethodConfig, PruneRequest, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod
from prunekit.models.adapter import as_weight_parameter, set_weight_matrix, weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.progress import progress as tqdm
from prunekit.surgery.masks import Target

GRANULARITIES = ("layer", "row")


@dataclass
class BesaConfig(MethodConfig):
    epochs: int = 2  # passes over the block's calibration windows
    batch_size: int = 1  # windows per training step
    lr: float = 0.05  # Adam learning rate on the candidate logits
    step: float = 0.01  # spacing of the candidate ratios 0, step, 2·step, ... < 1
    penalty: float = 100.0  # λ of the sparsity penalty
    granularity: str = "layer"  # one learned sparsity per layer, or per output row

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.penalty < 0:
            raise PrunekitError("besa needs epochs >= 0, batch_size >= 1, lr > 0, penalty >= 0")
        if not 0 < self.step < 1:
            raise PrunekitError(f"besa step must be in (0, 1), got {self.step}")
        if self.granularity not in GRANULARITIES:
            raise choice_error("granularity", self.granularity, GRANULARITIES)


class LearnedSparsity(nn.Module):
    """Learnable sparsity of one linear: logits [groups, D] over candidate ratios [D].

    `ranks` [out, in] is each weight's importance rank inside its row (0 = least).
    """

    def __init__(self, ranks: torch.Tensor, ratios: torch.Tensor, groups: int, start: float):
        super().__init__()
        width = ranks.shape[1]
        self.register_buffer("ranks", ranks)
        self.register_buffer("ratios", ratios)
        # candidate index per weight: the largest d with p_d · in <= rank
        bins = torch.searchsorted(ratios * width, ranks.float(), right=True) - 1
        self.register_buffer("bins", bins)
        init = -(((ratios - start) / 0.05) ** 2) / 2  # a bump centred on the target
        self.logits = nn.Parameter(init.repeat(groups, 1))

    def sparsity(self) -> torch.Tensor:
        """Expected sparsity of each group: [groups]."""
        return self.logits.softmax(-1) @ self.ratios

    def mask(self) -> torch.Tensor:
        """Straight-through keep mask [out, in]: hard forward, soft gradient."""
        beta = self.logits.softmax(-1)
        keep_prob = beta.cumsum(-1).expand(self.ranks.shape[0], -1).gather(1, self.bins)
        drop = torch.round(self.sparsity() * self.ranks.shape[1]).detach()
        hard = (self.ranks >= drop.unsqueeze(-1)).to(keep_prob.dtype)
        return hard + keep_prob - keep_prob.detach()

    def row_counts(self) -> torch.Tensor:
        """Continuous number of weights to drop in each row: [out]."""
        return self.sparsity().detach().expand(self.ranks.shape[0]) * self.ranks.shape[1]


def importance_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each score inside its row, 0 = least important: [out, in] long."""
    return scores.argsort(dim=1).argsort(dim=1)


def exact_counts(wanted: list[torch.Tensor], widths: list[int], total: int) -> list[torch.Tensor]:
    """Integer drop counts per row, each <= its row width, summing exactly to `total`,
    proportional to the continuous `wanted` counts (largest remainders)."""
    flat = torch.cat([w.double() for w in wanted])
    sizes = [w.numel() for w in wanted]
    caps = torch.repeat_interleave(torch.tensor(widths, dtype=torch.double), torch.tensor(sizes))
    scaled = (flat * total / flat.sum().clamp_min(1e-12)).clamp(max=caps)
    counts = scaled.floor()
    missing = total - int(counts.sum())
    while missing > 0:
        room = counts < caps
        order = torch.argsort((scaled - counts).masked_fill(~room, float("-inf")), descending=True)
        take = order[: min(missing, int(room.sum()))]
        counts[take] += 1
        missing = total - int(counts.sum())
    return list(counts.long().split(sizes))


@register
class Besa(LayerwiseMethod):
    name = "besa"
    summary = "learned per-layer/row sparsity from block reconstruction, straight-through masks"
    compute_dtypes = False  # its mask training runs in the weights' dtype
    needs = ("input_norm",)
    supports_nm = False
    Config = BesaConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        if calib is None:
            raise PrunekitError("besa needs calibration data")
        self.seed = request.seed
        self.block_facts: list[dict[str, float]] = []
        return super().run(lm, calib, request)

    def prune_block(self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target) -> None:
        config = self.config
        linears = ctx.linears()
        device = ctx.runner.device
        dense_out = ctx.forward()  # the targets, before the block changes
        weights = {path: weight_matrix(m).detach() for path, m in linears.items()}
        ratios = torch.arange(0.0, 1.0 - 1e-9, config.step, device=device)
        learners = {}
        for path, w in weights.items():
            scores = w.float().abs() * stats[path]["input_norm"].to(w.device).unsqueeze(0)
            groups = w.shape[0] if config.granularity == "row" else 1
            learners[path] = LearnedSparsity(
                importance_ranks(scores).to(device), ratios, groups, target.sparsity
            )
        sizes = {path: w.numel() for path, w in weights.items()}
        total = sum(sizes.values())

        def mean_sparsity() -> torch.Tensor:
            return sum(m.sparsity().mean() * sizes[p] for p, m in learners.items()) / total

        params = [p for learner in learners.values() for p in learner.parameters()]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + ctx.index)
        size = config.batch_size
        starts = list(range(0, ctx.inputs.shape[0], size))
        frozen = [p.requires_grad for p in ctx.block.parameters()]
        ctx.block.requires_grad_(False)
        last = float("nan")
        try:
            steps = range(config.epochs)
            for _ in tqdm(steps, desc=f"besa block {ctx.index}", leave=False):
                for i in torch.randperm(len(starts), generator=generator).tolist():
                    start = starts[i]
                    overrides = {
                        f"{path}.weight": as_weight_parameter(
                            linears[path], weights[path] * learner.mask().to(weights[path].dtype)
                        )
                        for path, learner in learners.items()
                    }
                    out = ctx.apply(ctx.inputs[start : start + size], overrides)
                    wanted = dense_out[start : start + size].to(device)
                    recon = (out - wanted).pow(2).mean() / wanted.pow(2).mean().clamp_min(1e-12)
                    loss = recon + config.penalty * (mean_sparsity() - target.sparsity) ** 2
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    last = recon.item()
        finally:
            for p, flag in zip(ctx.block.parameters(), frozen, strict=True):
                p.requires_grad_(flag)
        learned = mean_sparsity().item()
        counts = exact_counts(
            [learners[p].row_counts() for p in weights],
            [w.shape[1] for w in weights.values()],
            round(target.sparsity * total),
        )
        for (path, w), count in zip(weights.items(), counts, strict=True):
            keep = learners[path].ranks >= count.to(device).unsqueeze(1)
            set_weight_matrix(linears[path], w * keep.to(w.device))
        self.block_facts.append({"learned_sparsity": learned, "reconstruction_loss": last})

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        raise PrunekitError("besa prunes whole blocks and needs calibration data")

    def details(self) -> dict:
        return {"besa": {"blocks": self.block_facts}}
