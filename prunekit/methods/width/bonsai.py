"""Bonsai (Dery et al., 2024, "Everybody Prune Now"): structured pruning from forward
passes only, as ldery/Bonsai does it.

Units are single attention heads (a KV group on GQA models: a query head alone cannot be
cut without giving groups different sizes) and single MLP channels. Rounds remove
`prune_frac` of the original decoder parameters each (the last one what is left), until
the sparsity is within `tol` of the target. Each round:

1. Prior: a Wanda score per unit from one pass of the unmasked model (per input column of
   o / down: mean over rows of |W| times the column's RMS activation, averaged over the
   forward batches; a head's columns averaged). Per block part (attention, MLP), the top
   `int(n·(1 − 2·f))` units are fixed (never dropped); the others are dropped with
   probability proportional to `max(score) − score`.
2. `samples` sub-models in complementary pairs: one drops `int(f·n) + 1` units per part,
   its complement drops every non-fixed unit the first one kept. Each is scored by −PPL
   on the calibration windows.
3. A linear model of −PPL on the non-fixed units' keep masks, L1-regularised, its
   settings chosen by cross-validated Kendall tau (`bonsai_regression.fit_l1`).
4. The units with the smallest coefficients are cut (model-wide, weighted by parameter
   count) while their cumulative cost stays within the round's budget.

A block always keeps at least one unit of each part (prunekit's surgery keeps attention
and MLP in every block; the reference may drop a whole module).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError, choice_error
from prunekit.eval.perplexity import mean_nll, window_nll
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.methods.width.base import check_reachable
from prunekit.methods.width.bonsai_regression import fit_l1, fit_ridge
from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.progress import progress as tqdm
from prunekit.surgery.hooks import input_scale_hook, removed_after
from prunekit.surgery.plan import block_costs
from prunekit.surgery.width import (
    block_widths,
    decoder_parameters,
    keep_channels,
    keep_heads,
    update_config_widths,
)

GROUP, CHANNELS = "kv_group", "channels"
PRIORS = ("wanda", "magnitude", "random")
FITS = ("l1", "ridge")
MAX_PPL = 1e8  # the reference clips a sub-model's perplexity here


@dataclass
class BonsaiConfig(MethodConfig):
    prune_frac: float = 0.05  # share of the original decoder parameters cut per round
    samples: int = 200  # sub-models per round (complementary pairs)
    prior: str = "wanda"  # wanda | magnitude | random: unit scores that steer sampling
    mlp_attn_ratio: float = 1.0  # attention drops prune_frac * this per sub-model
    tol: float = 0.02  # stop when the sparsity is within this of the target
    fit: str = "l1"  # l1 (reference: Adam, L1, cross-validated settings) | ridge (closed form)
    epochs: int = 50  # epochs of the L1 fit
    ridge: float = 1.0  # penalty of fit=ridge

    def __post_init__(self) -> None:
        if not 0.0 < self.prune_frac < 0.5:
            raise PrunekitError(f"prune_frac must be in (0, 0.5), got {self.prune_frac}")
        if self.samples < 2 or self.samples % 2:
            raise PrunekitError(f"samples must be even and >= 2, got {self.samples}")
        if self.prior not in PRIORS:
            raise choice_error("prior", self.prior, PRIORS)
        if self.fit not in FITS:
            raise choice_error("fit", self.fit, FITS)
        if self.mlp_attn_ratio <= 0 or self.tol < 0 or self.epochs < 1 or self.ridge < 0:
            raise PrunekitError("mlp_attn_ratio must be > 0, tol and ridge >= 0, epochs >= 1")


@dataclass(frozen=True)
class Part:
    """The KV groups or the MLP channels of block `block`: `size` units of `cost` params."""

    block: int
    kind: str  # GROUP or CHANNELS
    size: int
    cost: int


def build_parts(adapter: ModelAdapter) -> list[Part]:
    """Every block's attention (when heads are removable and it has >1 KV group) and MLP."""
    parts = []
    for index, block in enumerate(adapter.blocks):
        costs, widths = block_costs(adapter, block), block_widths(adapter, block)
        if adapter.spec.heads_removable and widths.kv_heads > 1:
            parts.append(Part(index, GROUP, widths.kv_heads, costs.group))
        parts.append(Part(index, CHANNELS, widths.intermediate, costs.channel))
    return parts


def offsets(parts: list[Part]) -> list[int]:
    """Start of each part's units in the flat unit vector (and the total at the end)."""
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + part.size)
    return starts


def _output_linear(adapter: ModelAdapter, part: Part) -> nn.Module:
    return adapter.linear(adapter.blocks[part.block], "o" if part.kind == GROUP else "down")


class StructureMasks:
    """Zero dropped units by scaling the inputs of each part's o or down projection:
    exactly the function of the model with those structures cut out."""

    def __init__(self, adapter: ModelAdapter, parts: list[Part]):
        self.adapter, self.parts = adapter, parts
        self.masks = [torch.ones(part.size) for part in parts]

    def set_keep(self, keep: torch.Tensor) -> None:
        """Keep the units where `keep` [units] (0/1, flat over parts) is 1."""
        for mask, start, part in zip(self.masks, offsets(self.parts), self.parts, strict=False):
            mask.copy_(keep[start : start + part.size])

    @contextmanager
    def attached(self) -> Iterator[StructureMasks]:
        """Hooks that apply the masks while the context is open."""
        group = self.adapter.group_width
        handles = [
            _output_linear(self.adapter, part).register_forward_pre_hook(
                input_scale_hook(lambda m=mask: m, group if part.kind == GROUP else 1)
            )
            for part, mask in zip(self.parts, self.masks, strict=True)
        ]
        with removed_after(handles):
            yield self


def prior_scores(
    model: nn.Module,
    adapter: ModelAdapter,
    parts: list[Part],
    windows: torch.Tensor,
    prior: str,
    batch_size: int,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Per part, a score per unit ([size], float32; higher = more important), from one pass
    over `windows` [n, L]: per input column of o / down, Wanda (mean over rows of |W| times
    the column's RMS input) or magnitude (mean |input|), averaged over forward batches;
    a KV group's columns averaged. `random` draws uniform scores."""
    if prior == "random":
        return [torch.rand(part.size, generator=generator) for part in parts]
    sums: list[torch.Tensor | None] = [None] * len(parts)

    def hook(index: int):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().flatten(0, -2)
            if prior == "wanda":
                rms = x.pow(2).mean(0).sqrt()
                value = (weight_matrix(module).float().abs() * rms).mean(0)
            else:
                value = x.abs().mean(0)
            sums[index] = value if sums[index] is None else sums[index] + value

        return fn

    handles = [
        _output_linear(adapter, part).register_forward_pre_hook(hook(i))
        for i, part in enumerate(parts)
    ]
    with removed_after(handles):
        window_nll(model, windows, batch_size, progress=False)
    batches = -(-windows.shape[0] // batch_size)
    return [
        (total.cpu() / batches).view(part.size, -1).mean(1)
        for total, part in zip(sums, parts, strict=True)
    ]


@dataclass
class SamplingPlan:
    """One part's fixed units, its sampled units and their drop probabilities [size]."""

    fixed: torch.Tensor
    sampled: torch.Tensor
    proba: torch.Tensor
    drop: int  # units dropped per sub-model


def sampling_plan(scores: torch.Tensor, frac: float) -> SamplingPlan:
    """Fix the top `int(n·(1 − 2·frac))` units (at least one); drop the rest with
    probability ∝ max(score) − score, `int(frac·n) + 1` of them per sub-model."""
    n = scores.numel()
    order = torch.argsort(-scores.double(), stable=True)
    fixed_count = max(int(n * (1.0 - 2.0 * frac)), 1)
    fixed, sampled = order[:fixed_count], order[fixed_count:]
    proba = (scores.max() - scores).double()
    proba[fixed] = 0.0
    if float(proba.sum()) <= 0.0:  # ties everywhere: uniform over the sampled units
        proba[sampled] = 1.0
    proba = proba / proba.sum() if sampled.numel() else proba
    drop = min(int(frac * n) + 1, int((proba > 0).sum()))
    return SamplingPlan(fixed, sampled, proba, drop)


def sample_pairs(
    parts: list[Part], plans: list[SamplingPlan], samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Keep masks [samples, units] (flat over parts) in complementary pairs: a random
    sub-model, then its complement over the non-fixed units."""
    starts = offsets(parts)
    fixed = torch.cat([plan.fixed + start for plan, start in zip(plans, starts, strict=False)])
    rows = []
    for _ in range(samples // 2):
        keep = torch.ones(starts[-1])
        for plan, start in zip(plans, starts, strict=False):
            if plan.drop:
                keep[start + torch.multinomial(plan.proba, plan.drop, generator=generator)] = 0.0
        complement = 1.0 - keep
        complement[fixed] = 1.0
        rows += [keep, complement]
    return torch.stack(rows)


def select_removals(coefficients: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions of the lowest coefficients [m] whose cumulative cost [m] stays <= budget."""
    order = torch.argsort(coefficients, stable=True)
    spent = torch.cumsum(costs[order], 0)
    return order[spent <= budget]


def cut_units(adapter: ModelAdapter, parts: list[Part], removed: torch.Tensor) -> None:
    """Cut the flat unit indices `removed` out of their blocks."""
    starts = offsets(parts)
    for part, start in zip(parts, starts, strict=False):
        mine = removed[(removed >= start) & (removed < start + part.size)] - start
        if not mine.numel():
            continue
        kept = sorted(set(range(part.size)) - set(mine.tolist()))
        block = adapter.blocks[part.block]
        (keep_heads if part.kind == GROUP else keep_channels)(adapter, block, kept)
    update_config_widths(adapter)


def calib_ppl(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Perplexity over `windows` [n, L], clipped at MAX_PPL."""
    return min(math.exp(min(mean_nll(model, windows, batch_size), 700.0)), MAX_PPL)


@register
class Bonsai(Method):
    name = "bonsai"
    summary = "forward passes of random sub-models, regression of -PPL on kept heads/channels"
    kind = "structured"
    supports_nm = False
    sparsity_meaning = "share of decoder-block parameters removed"
    no_allocation = "bonsai chooses where to prune itself"
    Config = BonsaiConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        config, adapter, model = self.config, lm.adapter, lm.model
        before = decoder_parameters(adapter)
        parts = build_parts(adapter)
        most = sum((part.size - 1) * part.cost for part in parts) / before
        check_reachable(self.name, request.sparsity, most, "one head and one channel stay")
        generator = torch.Generator().manual_seed(request.seed)
        home = next(model.parameters()).device
        model.to(request.device)
        rounds, current = [], 0.0
        bar = tqdm(desc="bonsai rounds", total=round(request.sparsity * 100), leave=False)
        while abs(current - request.sparsity) >= config.tol and current < request.sparsity:
            frac = min(config.prune_frac, request.sparsity - current)
            facts = self._round(lm, calib, request, frac, int(before * frac), generator)
            if not facts["removed_units"]:
                break
            current = 1 - decoder_parameters(adapter) / before
            rounds.append({"prune_frac": round(frac, 6), **facts, "sparsity": round(current, 6)})
            bar.update(round(current * 100) - bar.n)
        bar.close()
        model.to(home)
        after = decoder_parameters(adapter)
        kept = {
            str(i): {
                "kv_groups": block_widths(adapter, b).kv_heads,
                "channels": block_widths(adapter, b).intermediate,
            }
            for i, b in enumerate(adapter.blocks)
        }
        return {
            "decoder_parameters_before": before,
            "decoder_parameters_after": after,
            "decoder_share_removed": round(1 - after / before, 6),
            "rounds": rounds,
            "widths": kept,
        }

    def _round(
        self,
        lm: LoadedModel,
        calib: torch.Tensor,
        request: PruneRequest,
        frac: float,
        budget: int,
        generator: torch.Generator,
    ) -> dict:
        """One Bonsai round removing at most `budget` parameters; facts about it."""
        config, adapter, model = self.config, lm.adapter, lm.model
        parts = build_parts(adapter)
        scores = prior_scores(
            model, adapter, parts, calib, config.prior, request.batch_size, generator
        )
        plans = [
            sampling_plan(s, frac * (config.mlp_attn_ratio if p.kind == GROUP else 1.0))
            for s, p in zip(scores, parts, strict=True)
        ]
        keep = sample_pairs(parts, plans, config.samples, generator)
        perf = torch.empty(config.samples, dtype=torch.float64)
        masks = StructureMasks(adapter, parts)
        with masks.attached():
            for s in tqdm(range(config.samples), desc="bonsai sub-models", leave=False):
                masks.set_keep(keep[s])
                perf[s] = -calib_ppl(model, calib, request.batch_size)
        starts = offsets(parts)
        sampled = torch.cat([p.sampled + s for p, s in zip(plans, starts, strict=False)])
        costs = torch.cat(
            [
                torch.full((p.sampled.numel(),), part.cost)
                for p, part in zip(plans, parts, strict=True)
            ]
        )
        if config.fit == "l1":
            coefficients, fit = fit_l1(keep[:, sampled], perf, config.epochs, generator)
        else:
            coefficients, fit = fit_ridge(keep[:, sampled], perf, config.ridge), {}
        removed = sampled[select_removals(coefficients, costs, budget)]
        cut_units(adapter, parts, removed)
        return {
            **fit,
            "mean_submodel_ppl": round(float(-perf.mean()), 4),
            "sampled_units": int(sampled.numel()),
            "removed_units": int(removed.numel()),
        }
