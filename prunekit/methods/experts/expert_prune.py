"""Expert pruning for mixture-of-experts models: remove the same share of experts from
every MoE layer, chosen by a calibration statistic of the tokens actually routed.

Criteria (`criterion`):
- `reap` (router-weighted expert activation pruning, Lasby et al., 2025): the mean over
  the tokens routed to an expert of gate weight × ‖expert output‖₂;
- `frequency`: the number of routed token slots;
- `gate`: the summed gate weight of the routed slots.
With `merge=true` each removed expert is first folded into the kept expert whose weights
are most similar (cosine of the flattened gate/up and down weights): the kept weights
become the routing-mass-weighted mean (mass = summed gate weight of the routed slots);
the kept expert's router row is unchanged.
The lowest-scoring experts are removed (ties: the higher index goes first); the router's
rows and the experts' slices go with them and the config's expert count is updated, so
the folder loads in plain transformers. At least `top_k` experts stay. An expert that no
calibration token reached scores 0 under every criterion and is reported by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.methods.experts.routed import routed_pass
from prunekit.models.loading import LoadedModel
from prunekit.surgery.experts import expert_count, keep_experts, top_k, update_expert_config

CRITERIA = ("reap", "frequency", "gate")


@dataclass
class ExpertConfig(MethodConfig):
    criterion: str = "reap"
    merge: bool = False  # fold each removed expert into its most similar kept one

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise choice_error("criterion", self.criterion, CRITERIA)


def merge_into_similar(experts: nn.Module, drop: list[int], mass: torch.Tensor) -> dict:
    """Fold every expert in `drop` into its most similar kept expert (weights averaged by
    routing `mass` [experts]); returns {removed: kept}."""
    kept = [e for e in range(experts.gate_up_proj.shape[0]) if e not in drop]
    flat = torch.cat([experts.gate_up_proj.flatten(1), experts.down_proj.flatten(1)], 1)
    flat = F.normalize(flat.float(), dim=1)
    total = mass.clone().double()
    targets = {}
    with torch.no_grad():
        for r in drop:
            k = kept[int((flat[kept] @ flat[r]).argmax())]
            targets[r] = k
            a, b = float(total[k]), float(mass[r])
            if a + b <= 0:
                continue
            for weight in (experts.gate_up_proj, experts.down_proj):
                weight[k] = (weight[k] * a + weight[r] * b) / (a + b)
            total[k] = a + b
    return targets


def expert_outputs(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's output [tokens, H] for inputs x [tokens, H] (fused GLU weights)."""
    gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


class RoutedStatistics:
    """Per-expert sums over the routed token slots of one MoE module: count, gate weight
    and gate weight × ‖output‖, from a forward pre-hook on its experts module."""

    def __init__(self, moe: nn.Module):
        n = expert_count(moe)
        self.count = torch.zeros(n, dtype=torch.float64)
        self.gate = torch.zeros(n, dtype=torch.float64)
        self.reap = torch.zeros(n, dtype=torch.float64)
        self.handle = moe.experts.register_forward_pre_hook(self.hook)

    @torch.no_grad()
    def hook(self, experts: nn.Module, args: tuple) -> None:
        x, index, weights = args[0], args[1], args[2]
        for e in index.unique().tolist():
            tokens, slots = torch.where(index == e)
            w = weights[tokens, slots].double()
            norms = expert_outputs(experts, x[tokens], e).double().norm(dim=-1)
            self.count[e] += tokens.numel()
            self.gate[e] += float(w.sum())
            self.reap[e] += float((w * norms).sum())

    def scores(self, criterion: str) -> torch.Tensor:
        if criterion == "frequency":
            return self.count
        if criterion == "gate":
            return self.gate
        return self.reap / self.count.clamp_min(1)


@register
class ExpertPrune(Method):
    name = "expert_prune"
    summary = "remove whole experts per MoE layer by routed activation (REAP), frequency or gate"
    kind = "experts"
    supports_nm = False
    sparsity_meaning = "share of the experts removed from every MoE layer"
    no_allocation = "expert_prune removes the same number of experts in every layer"
    Config = ExpertConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        adapter = lm.adapter
        if not adapter.spec.moe:
            raise PrunekitError(
                f"expert_prune needs a mixture-of-experts model; got {adapter.config.model_type}"
            )
        modules = [adapter.moe(block) for block in adapter.blocks]
        total, k = expert_count(modules[0]), top_k(modules[0])
        remove = round(request.sparsity * total)
        if total - remove < k:
            raise PrunekitError(
                f"removing {remove} of {total} experts leaves fewer than top_k={k}; "
                f"valid: sparsity <= {(total - k) / total:.3f}"
            )
        stats = routed_pass(lm, calib, request, [RoutedStatistics(moe) for moe in modules])
        removed, unreached, merged = {}, {}, {}
        for i, (moe, s) in enumerate(zip(modules, stats, strict=True)):
            scores = s.scores(self.config.criterion)
            order = sorted(range(total), key=lambda e: (float(scores[e]), -e))
            drop = sorted(order[:remove])
            if self.config.merge:
                merged[str(i)] = merge_into_similar(moe.experts, drop, s.gate)
            keep_experts(moe, [e for e in range(total) if e not in drop])
            removed[str(i)] = drop
            if (s.count == 0).any():
                unreached[str(i)] = torch.nonzero(s.count == 0).flatten().tolist()
        update_expert_config(adapter)
        return {
            "experts_before": total,
            "experts_after": total - remove,
            "removed_experts": removed,
            "experts_no_calibration_token_reached": unreached,
            **({"merged_into": merged} if self.config.merge else {}),
        }

    def outcome(self, details: dict) -> str | None:
        line = f"experts per layer {details['experts_before']} -> {details['experts_after']}"
        if details["experts_no_calibration_token_reached"]:
            line += "; some experts saw no calibration token (see details)"
        return line
