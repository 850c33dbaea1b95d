"""BESA (Xu et al., ICLR 2024, "BESA: Pruning Large Language Models with Blockwise
Parameter-Efficient Sparsity Allocation"): each block learns how sparse each row (or each
linear) should be by minimising the block's reconstruction error.

As the reference (OpenGVLab/LLMPrune-BESA, row-wise setting `--blocksize 1`): the weights
of every row are sorted by Wanda importance |W_ij|·‖X_j‖. A group (one row, or the whole
linear with `granularity=layer`) holds logits over D+1 candidate ratios p_d = 0, step,
..., 1, initialised to zero (uniform); β = softmax(sigmoid(logits)) (`sigmoid_smooth`).
A weight at sorted position j is pruned with probability Σ_d β_d·[j < ⌊in·p_d⌋] and the
group's sparsity is s = Σ_d β_d p_d. The forward uses the hard mask "prune the ⌊s·in⌋
least important" with the soft keep probabilities' gradient (straight-through). The loss
on each calibration batch is

    Σ_c ‖(Y_c − Ŷ_c) / ‖Y_c‖‖² / hidden  +  beta · ((s_block − target) / target)²

with Y the dense block's output on the batch, normalised per hidden channel c over the
batch's tokens, and s_block the parameter-weighted mean sparsity of the block's linears;
one epoch over the windows in order, optimised by Prodigy (lr 1, d_coef 5, as in the
reference's scripts). The learned sparsity is kept as it is (the reference does not round
it to the target); `exact=true` rounds the learned per-row counts so every block has
exactly round(target · its weights) zeros.
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


OPTIMIZERS = ("prodigy", "adam")


@dataclass
class BesaConfig(MethodConfig):
    epochs: int = 1  # passes over the block's calibration windows
    batch_size: int = 1  # windows per training step
    granularity: str = "row"  # one learned sparsity per output row, or per linear ("layer")
    step: float = 0.01  # spacing of the candidate ratios 0, step, 2·step, ..., 1
    beta: float = 5.0  # weight of the relative sparsity penalty
    optimizer: str = "prodigy"  # prodigy (the reference's) or adam
    lr: float = 1.0  # Prodigy's lr (1 in the reference); Adam's learning rate
    d_coef: float = 5.0  # Prodigy's d_coef (the reference's 7B scripts)
    sigmoid_smooth: bool = True  # β = softmax(sigmoid(logits)), as the reference
    exact: bool = False  # round the learned counts so each block ends exactly at target

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.beta < 0:
            raise PrunekitError("besa needs epochs >= 0, batch_size >= 1, lr > 0, beta >= 0")
        if not 0 < self.step < 1:
            raise PrunekitError(f"besa step must be in (0, 1), got {self.step}")
        if self.granularity not in GRANULARITIES:
            raise choice_error("granularity", self.granularity, GRANULARITIES)
        if self.optimizer not in OPTIMIZERS:
            raise choice_error("optimizer", self.optimizer, OPTIMIZERS)


def candidate_ratios(step: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """0, step, 2·step, ..., 1 (1 included): [D + 1]. Built as the reference builds them
    (float32 steps down from 1, the last set to 0), so ⌊in·p_d⌋ matches it exactly."""
    ratios = torch.arange(1.0, -1 * step, -1 * step)
    ratios[-1] = 0.0
    return ratios.flip(0).to(device)


class LearnedSparsity(nn.Module):
    """Learnable sparsity of one linear: logits [groups, D + 1] over candidate ratios.

    `ranks` [out, in] is each weight's position in its row sorted by importance
    (0 = least important, pruned first).
    """

    def __init__(self, ranks: torch.Tensor, ratios: torch.Tensor, groups: int, smooth: bool):
        super().__init__()
        width = ranks.shape[1]
        self.smooth = smooth
        self.register_buffer("ranks", ranks)
        self.register_buffer("ratios", ratios)
        # weights at sorted position j are pruned under candidate d when j < floor(in · p_d);
        # `kept_below[j]` counts the candidates that keep it (floor(in · p_d) <= j)
        cuts = torch.floor(ratios.double() * width).float()  # as int(cols * p.item())
        positions = ranks.float().contiguous()
        self.register_buffer("kept_below", torch.searchsorted(cuts, positions, right=True))
        self.logits = nn.Parameter(torch.zeros(groups, ratios.numel(), device=ranks.device))

    def beta(self) -> torch.Tensor:
        logits = self.logits.sigmoid() if self.smooth else self.logits
        return logits.softmax(-1)

    def sparsity(self) -> torch.Tensor:
        """Expected sparsity of each group: [groups]."""
        return self.beta() @ self.ratios

    def keep_probability(self) -> torch.Tensor:
        """Soft keep probability of every weight [out, in]: 1 − Σ_d β_d·[j < ⌊in·p_d⌋]."""
        beta = self.beta()
        cdf = torch.cat([beta.new_zeros(beta.shape[0], 1), beta.cumsum(-1)], dim=1)
        return cdf.expand(self.ranks.shape[0], -1).gather(1, self.kept_below)

    def mask(self) -> torch.Tensor:
        """Straight-through keep mask [out, in]: hard forward, soft gradient."""
        keep_prob = self.keep_probability()
        drop = torch.floor(self.row_counts())
        hard = (self.ranks >= drop.unsqueeze(-1)).to(keep_prob.dtype)
        return hard + keep_prob - keep_prob.detach()

    def row_counts(self) -> torch.Tensor:
        """Continuous number of weights to drop in each row: [out]."""
        return self.sparsity().detach().expand(self.ranks.shape[0]) * self.ranks.shape[1]


def importance_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Position of each score in its row sorted ascending (stable), 0 = least: [out, in]."""
    return scores.argsort(dim=1, stable=True).argsort(dim=1)


def channel_normalised_error(out: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Σ_c ‖(Y_c − Ŷ_c) / ‖Y_c‖‖² / hidden, each hidden channel c normalised by its norm
    over the batch's tokens (the reference's `l2_scaler`)."""
    wanted = wanted.float().reshape(-1, wanted.shape[-1])
    scale = torch.linalg.vector_norm(wanted, dim=0)
    error = (wanted - out.float().reshape(-1, out.shape[-1])) / scale
    return error.pow(2).sum() / wanted.shape[-1]


def make_optimizer(config: BesaConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    try:
        from prodigyopt import Prodigy
    except ImportError as err:
        raise PrunekitError(
            "besa's default optimizer is Prodigy: pip install prodigyopt "
            "(or --opt optimizer=adam --opt lr=0.01)"
        ) from err
    return Prodigy(params, lr=config.lr, d_coef=config.d_coef, weight_decay=0.0)


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
    distributes = False  # it trains on its own windows
    needs = ("input_norm",)
    supports_nm = False
    Config = BesaConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        if calib is None:
            raise PrunekitError("besa needs calibration data")
        self.block_facts: list[dict[str, float]] = []
        return super().run(lm, calib, request)

    def prune_block(self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target) -> None:
        config = self.config
        linears = ctx.linears()
        device = ctx.runner.device
        dense_out = ctx.forward()  # the targets, before the block changes
        weights = {path: weight_matrix(m).detach() for path, m in linears.items()}
        ratios = candidate_ratios(config.step, device)
        learners = {}
        for path, w in weights.items():
            scores = w.float().abs() * stats[path]["input_norm"].to(w.device).unsqueeze(0)
            groups = w.shape[0] if config.granularity == "row" else 1
            ranks = importance_ranks(scores).to(device)
            learners[path] = LearnedSparsity(ranks, ratios, groups, config.sigmoid_smooth)
        sizes = {path: w.numel() for path, w in weights.items()}
        total = sum(sizes.values())

        def block_sparsity() -> torch.Tensor:
            return sum(m.sparsity().mean() * sizes[p] for p, m in learners.items()) / total

        params = [p for learner in learners.values() for p in learner.parameters()]
        optimizer = make_optimizer(config, params)
        size = config.batch_size
        frozen = [p.requires_grad for p in ctx.block.parameters()]
        ctx.block.requires_grad_(False)
        last = float("nan")
        goal = max(target.sparsity, 1e-6)
        try:
            for _ in tqdm(range(config.epochs), desc=f"besa block {ctx.index}", leave=False):
                for start in range(0, ctx.inputs.shape[0], size):  # in order, as the reference
                    overrides = {
                        f"{path}.weight": as_weight_parameter(
                            linears[path], weights[path] * learner.mask().to(weights[path].dtype)
                        )
                        for path, learner in learners.items()
                    }
                    out = ctx.apply(ctx.inputs[start : start + size], overrides)
                    recon = channel_normalised_error(
                        out, dense_out[start : start + size].to(device)
                    )
                    penalty = ((block_sparsity() - target.sparsity) / goal) ** 2
                    loss = recon + config.beta * penalty
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    last = recon.item()
        finally:
            for p, flag in zip(ctx.block.parameters(), frozen, strict=True):
                p.requires_grad_(flag)
        learned = block_sparsity().item()
        learned_counts = [learners[p].row_counts() for p in weights]
        if config.exact:
            widths = [w.shape[1] for w in weights.values()]
            counts = exact_counts(learned_counts, widths, round(target.sparsity * total))
        else:
            counts = [torch.floor(c).long() for c in learned_counts]
        for (path, w), count in zip(weights.items(), counts, strict=True):
            keep = learners[path].ranks >= count.to(device).unsqueeze(1)
            set_weight_matrix(linears[path], w * keep.to(w.device))
        self.block_facts.append({"learned_sparsity": learned, "reconstruction_loss": last})

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        raise PrunekitError("besa prunes whole blocks and needs calibration data")

    def details(self) -> dict:
        return {"besa": {"blocks": self.block_facts}}
