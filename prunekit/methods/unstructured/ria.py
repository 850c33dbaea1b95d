"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance and activations.

    score_ij = (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^a

A weight counts relative to both its output row and its input column, so no channel is
emptied wholesale. Unstructured masks use one threshold per layer by default, as the
reference's `main.py` does (`--per_outneuron` off); `--scope row` compares within rows.

With `permute=true` and an N:M pattern, the input channels of every layer whose producer
sits in the same block (down, o; see `prunekit.surgery.permutation`) are reordered so the
N:M mask keeps more total score; the permutation is folded into the producer's rows, so
the saved model is a plain checkpoint, its masks are N:M in stored order, and before
pruning it computes exactly what the original did. (The reference permutes every pruned
linear's scores, builds the mask in permuted order and un-permutes the mask, so its masks
are N:M only in permuted order; ours keep N:M valid in the stored order, which is what a
2:4 kernel needs, at the cost of permuting only layers with an in-block producer.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from prunekit.engine.collectors import permute_inputs
from prunekit.engine.runner import BlockContext, LayerStats
from prunekit.methods.base import MethodConfig, PruneRequest, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.surgery.masks import Target, make_mask
from prunekit.surgery.permutation import (
    apply_permutation,
    column_index,
    couplings,
    find_nm_permutation,
    group_scores,
    nm_retained,
)


@dataclass
class RIAConfig(MethodConfig):
    a: float = 0.5  # exponent of the input-activation norm
    permute: bool = False  # N:M only: channel permutation folded into the producers
    permute_rounds: int = 8  # linear-assignment refinement rounds per channel group


def ria_scores(weight: torch.Tensor, input_norm: torch.Tensor, a: float) -> torch.Tensor:
    """RIA importance of `weight` [out, in] given ‖X_j‖₂ [in]: [out, in]."""
    w = weight.abs().float()
    row = w.sum(1, keepdim=True).clamp_min(1e-12)
    col = w.sum(0, keepdim=True).clamp_min(1e-12)
    return (w / row + w / col) * input_norm.float().pow(a).unsqueeze(0)


@register
class RIA(LayerwiseMethod):
    name = "ria"
    summary = "relative importance |W|/row + |W|/col times ‖X‖^a; N:M channel permutation"
    needs = ("input_norm",)
    default_scope = "layer"
    Config = RIAConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        self._retained: dict[str, list[float]] = {}  # layer -> [identity, permuted] shares
        self._permuted: set[str] = set()
        if self.config.permute and not request.pattern.is_nm:
            warnings.warn("ria: permute only changes N:M masks; ignored", stacklevel=2)
        facts = super().run(lm, calib, request)  # e.g. what a weight update did
        if not self._retained:
            return facts
        permutable = {k: v for k, v in self._retained.items() if k in self._permuted}
        return facts | {
            "permutation": {
                "applied": bool(permutable),
                "retained_all_layers": _mean_pair(self._retained),
                "retained_permuted_layers": _mean_pair(permutable) if permutable else None,
                "retained": {k: [round(x, 6) for x in v] for k, v in self._retained.items()},
            }
        }

    def prepare_block(
        self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target
    ) -> None:
        """N:M with permute: reorder each coupled consumer's inputs (and its producers'
        rows) so the mask keeps more score; its statistics are reordered alike."""
        if not (self.config.permute and target.pattern.is_nm):
            return
        n, m = target.pattern.n, target.pattern.m
        linears = ctx.linears()
        for path, coupled in couplings(ctx.adapter, ctx.block).items():
            groups = [g for g in coupled if g.size % m == 0]
            if not groups:
                continue
            weight = weight_matrix(linears[path])
            scores = ria_scores(weight, stats[path]["input_norm"].to(weight.device), self.config.a)
            total = float(scores.sum())
            perms = [
                find_nm_permutation(group_scores(scores, g), n, m, self.config.permute_rounds)
                for g in groups
            ]
            apply_permutation(linears[path], groups, perms)
            index = column_index(groups, perms, scores.shape[1])
            stats[path] = permute_inputs(stats[path], index)
            key = f"{ctx.index}.{path}"
            self._retained[key] = [nm_retained(scores, n, m) / total]
            self._retained[key].append(nm_retained(scores[:, index], n, m) / total)
            self._permuted.add(key)

    def prune_block(self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target) -> None:
        n, m = target.pattern.n, target.pattern.m
        for path, module in ctx.linears().items():
            weight = weight_matrix(module)
            scores = ria_scores(weight, stats[path]["input_norm"].to(weight.device), self.config.a)
            key = f"{ctx.index}.{path}"
            if target.pattern.is_nm and key not in self._permuted:
                share = nm_retained(scores, n, m) / float(scores.sum())
                self._retained[key] = [share, share]
            weight.mul_(make_mask(scores, target))


def _mean_pair(retained: dict[str, list[float]]) -> dict[str, float]:
    """Mean share of score kept by N:M over layers, without and with permutation."""
    values = list(retained.values())
    return {
        "identity": sum(v[0] for v in values) / len(values),
        "permuted": sum(v[1] for v in values) / len(values),
    }
