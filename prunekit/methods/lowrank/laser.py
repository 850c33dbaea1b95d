"""LASER (Sharma, Ash and Misra, 2023, "The Truth is in There: Improving Reasoning in
Language Models with Layer-Selective Rank Reduction"), as pratyushasharma/laser does it.

An intervention (block ℓ, matrix type τ, ρ) replaces the weight W [out, in] of τ in block
ℓ by its rank-k approximation, k = int(ρ · min(out, in)), from `torch.svd_lowrank` with
2 power iterations (the reference's `do_low_rank`; `svd=exact` uses the full SVD).
`--sparsity` is 1 − ρ, the share of the rank removed. With `search=true` every single
intervention of the grid `layers` × `matrices` × ρ ∈ SEARCH_RHOS (the reference's rates
1, 2, 4, 6, 8, 9, 9.5, 9.9, 9.95, ρ = 1 − rate/10) is scored by the mean token NLL on the
calibration windows (the validation set) and the best one is applied, as the paper selects
interventions on a validation split.

The result is stored as two linears (`LowRankLinear`: [k, in] then [out, k]) when that is
smaller than W; otherwise the dense rank-k product replaces W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError, choice_error
from prunekit.eval.perplexity import mean_nll
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.models.pruned_modeling import LowRankLinear
from prunekit.progress import progress as tqdm
from prunekit.surgery.width import update_config_widths

SEARCH_RHOS = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01, 0.005)
SVDS = ("lowrank", "exact")


@dataclass
class LaserConfig(MethodConfig):
    layers: str = "-1"  # block indices ("-1" = last; "all"; "20,21,-1")
    matrices: str = "up"  # linear roles, e.g. "up", "q,k,v,o", "all"
    search: bool = False  # pick the best single (layer, matrix, rho) on the calibration set
    svd: str = "lowrank"  # lowrank (torch.svd_lowrank, niter 2: the reference) | exact

    def __post_init__(self) -> None:
        if self.svd not in SVDS:
            raise choice_error("svd", self.svd, SVDS)


def parse_layers(text: str, num_blocks: int) -> list[int]:
    """Block indices from "all" or a comma list (negative counts from the end)."""
    if text == "all":
        return list(range(num_blocks))
    try:
        raw = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise PrunekitError(f"layers must be 'all' or block indices, got {text!r}") from err
    bad = [i for i in raw if not -num_blocks <= i < num_blocks]
    if bad or not raw:
        raise PrunekitError(f"layers {bad or text!r} out of range; valid: 0..{num_blocks - 1}")
    return sorted({i % num_blocks for i in raw})


def parse_matrices(text: str, adapter: ModelAdapter) -> list[str]:
    roles = list(adapter.spec.linears)
    chosen = roles if text == "all" else [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(roles))
    if unknown or not chosen:
        raise PrunekitError(f"unknown matrix {', '.join(unknown)}; valid: {', '.join(roles)}")
    return chosen


def kept_rank(weight: torch.Tensor, rho: float) -> int:
    """k = int(rho · min(out, in)), at least 1."""
    return max(int(min(weight.shape) * rho), 1)


def low_rank_factors(
    weight: torch.Tensor, rank: int, svd: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outer [out, k] = U·S, inner [k, in] = Vᵀ) of W's rank-k approximation (float32)."""
    w = weight.float()
    if svd == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=rank, niter=2)
    return u * s, v.t()


def replace(adapter: ModelAdapter, block: nn.Module, role: str, module: nn.Module) -> None:
    """Put `module` where the `role` linear of `block` is."""
    path = next(p for p, m in adapter.linears(block).items() if m is adapter.linear(block, role))
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, module)


def apply_low_rank(
    adapter: ModelAdapter, block: nn.Module, role: str, rho: float, svd: str, seed: int
) -> dict:
    """Replace one linear by its rank-k approximation; facts about it."""
    linear = adapter.linear(block, role)
    weight = weight_matrix(linear)
    rank = kept_rank(weight, rho)
    outer, inner = low_rank_factors(weight, rank, svd, seed)
    out_features, in_features = weight.shape
    factored = rank * (out_features + in_features) < out_features * in_features
    if factored:
        bias = getattr(linear, "bias", None)
        module = LowRankLinear(in_features, out_features, rank, bias is not None, weight)
        with torch.no_grad():
            module.inner.weight.copy_(inner)
            module.outer.weight.copy_(outer)
            if bias is not None:
                module.outer.bias.copy_(bias)
        replace(adapter, block, role, module)
    else:
        with torch.no_grad():
            weight.copy_((outer @ inner).to(weight.dtype))
    return {"rank": rank, "max_rank": min(out_features, in_features), "factored": factored}


@register
class Laser(Method):
    name = "laser"
    summary = "rank-k approximation of chosen matrices, optionally searched (Sharma et al.)"
    kind = "lowrank"
    supports_nm = False
    sparsity_meaning = "share of the rank removed from each chosen matrix (1 - rho)"
    no_allocation = "laser chooses its matrices by --opt layers/matrices or search"
    Config = LaserConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        config, adapter = self.config, lm.adapter
        layers = parse_layers(config.layers, len(adapter.blocks))
        roles = parse_matrices(config.matrices, adapter)
        if not config.search:
            choices = [(layer, role, 1.0 - request.sparsity) for layer in layers for role in roles]
            facts = {"search": None}
        else:
            best, scores = self._search(lm, calib, request, layers, roles)
            choices = [best] if best is not None else []
            facts = {"search": scores, "chosen": list(best) if best else None}
        applied = []
        for layer, role, rho in choices:
            block = adapter.blocks[layer]
            done = apply_low_rank(adapter, block, role, rho, config.svd, request.seed)
            applied.append({"block": layer, "matrix": role, "rho": rho, **done})
        update_config_widths(adapter)
        return {**facts, "applied": applied}

    def outcome(self, details: dict) -> str | None:
        if details["search"] is not None and details["chosen"] is None:
            return "no intervention lowered the calibration loss: the model is unchanged"
        return "; ".join(
            f"block {a['block']} {a['matrix']}: rank {a['rank']} of {a['max_rank']}"
            + (" (two linears)" if a["factored"] else "")
            for a in details["applied"]
        )

    def _search(
        self,
        lm: LoadedModel,
        calib: torch.Tensor,
        request: PruneRequest,
        layers: list[int],
        roles: list[str],
    ) -> tuple[tuple[int, str, float] | None, list[dict]]:
        """Calibration NLL of every single intervention; the best (layer, role, rho), or
        None when none lowers the dense model's NLL (the model is then left unchanged)."""
        adapter, model = lm.adapter, lm.model
        base = mean_nll(model, calib, request.batch_size)
        scores, best = [], (None, base)
        grid = [(layer, role, rho) for layer in layers for role in roles for rho in SEARCH_RHOS]
        for layer, role, rho in tqdm(grid, desc="laser search", leave=False):
            linear = adapter.linear(adapter.blocks[layer], role)
            weight = weight_matrix(linear)
            original = weight.clone()
            outer, inner = low_rank_factors(
                weight, kept_rank(weight, rho), self.config.svd, request.seed
            )
            with torch.no_grad():
                weight.copy_((outer @ inner).to(weight.dtype))
            loss = mean_nll(model, calib, request.batch_size)
            with torch.no_grad():
                weight.copy_(original)
            scores.append({"block": layer, "matrix": role, "rho": rho, "nll": round(loss, 6)})
            if loss < best[1]:
                best = ((layer, role, rho), loss)
        return best[0], [{"dense_nll": round(base, 6)}, *scores]
