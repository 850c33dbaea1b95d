"""LLM Surgeon (van der Ouderaa et al., ICLR 2024): global pruning with K-FAC curvature.

Over `shots` rounds the target grows linearly (shot t of T prunes to t/T of the sparsity).
Each round:

1. K-FAC factors of every linear from one backward pass over the calibration windows
   (`engine/kfac.py`): F ≈ G ⊗ A, inverted with damping λ·mean(diag) (`damp_g`, `damp_a`).
2. The cost of removing weight (i, j) is the OBS loss 0.5·W_ij² / ([G⁻¹]_ii [A⁻¹]_jj);
   one threshold over all linears of all blocks picks the weights to remove (so layers end
   at different sparsities). For N:M, a group's cost is the sum of its m − n cheapest
   weights, and whole groups are pruned by one global threshold.
3. The remaining weights of each linear get the correlated OBS update
   ΔW = −G⁻¹ M A⁻¹ with M_Q = ([G⁻¹ ⊗ A⁻¹]_QQ)⁻¹ w_Q over the removed set Q, solved in
   groups of whole rows of at most `max_correlate` removed weights (one row when a row
   holds more); with `add_update` each group sees the earlier groups' changes.

Defaults are those of Qualcomm-AI-research/llm-surgeon's unstructured and 2:4 scripts
(`--shots 20 --max_correlate 2000 --addupdate --damp_g 0.1`, `damp_a` 0.01, `--use_iad`,
Kronecker rank 1, true labels, no LoRA between shots). Rows or columns whose weights are
all zero, or whose factor diagonal is zero, are dead: zeroed and left out of the solves.
The reference prunes every weight whose cost is ≤ the cost at position ⌊s·N⌋ (one more
than s·N, plus ties); prunekit removes exactly round(s·N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.engine.kfac import kfac_factors
from prunekit.errors import PrunekitError
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel
from prunekit.progress import progress as tqdm
from prunekit.surgery.masks import Pattern, global_masks


@dataclass
class LLMSurgeonConfig(MethodConfig):
    shots: int = 20  # rounds of pruning, the target rising linearly
    max_correlate: int = 2000  # removed weights solved jointly (whole rows); 0: all at once
    damp_g: float = 0.1  # damping of G, as a fraction of mean(diag(G))
    damp_a: float = 0.01  # damping of A, as a fraction of mean(diag(A))
    add_update: bool = True  # each row group starts from the earlier groups' updates

    ranges = {"shots": ">= 1", "max_correlate": ">= 0", "damp_g": "> 0", "damp_a": "> 0"}


def damped_inverse(matrix: torch.Tensor, damp: float) -> torch.Tensor:
    """(M + damp·mean(diag M)·I)⁻¹ through a float64 Cholesky, returned as float32."""
    eye = torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
    m = matrix.double() + damp * matrix.diagonal().double().mean() * eye
    return torch.cholesky_inverse(torch.linalg.cholesky(m)).float()


@dataclass
class Curvature:
    """One linear's inverse K-FAC factors on its live rows and columns."""

    rows: torch.Tensor  # bool [out]
    cols: torch.Tensor  # bool [in]
    g_inv: torch.Tensor  # [live out, live out]
    a_inv: torch.Tensor  # [live in, live in]

    @classmethod
    def build(
        cls, weight: torch.Tensor, a: torch.Tensor, g: torch.Tensor, config: LLMSurgeonConfig
    ) -> Curvature:
        """Zero the dead rows and columns of `weight` [out, in] (in place) and invert."""
        rows = weight.ne(0).any(1) & g.diagonal().ne(0)
        cols = weight.ne(0).any(0) & a.diagonal().ne(0)
        weight[~rows] = 0
        weight[:, ~cols] = 0
        g_inv = damped_inverse(g[rows][:, rows], config.damp_g)
        a_inv = damped_inverse(a[cols][:, cols], config.damp_a)
        return cls(rows, cols, g_inv, a_inv)

    def costs(self, weight: torch.Tensor) -> torch.Tensor:
        """OBS removal costs [out, in]: 0.5·W² / ([G⁻¹]_ii [A⁻¹]_jj); 0 where dead."""
        live = weight[self.rows][:, self.cols].float()
        costs = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        inner = 0.5 * live.square() / torch.outer(self.g_inv.diagonal(), self.a_inv.diagonal())
        costs[self.rows.nonzero(), self.cols.nonzero().T] = inner
        return costs


def row_groups(counts: torch.Tensor, max_correlate: int) -> list[torch.Tensor]:
    """Consecutive rows with removals, grouped while a group holds ≤ `max_correlate`
    removed weights (a row holding more stands alone; 0 puts every row in one group)."""
    groups, current, count = [], [], 0
    for row in counts.nonzero().flatten().tolist():
        num = int(counts[row])
        if max_correlate and current and count + num > max_correlate:
            groups.append(current)
            current, count = [], 0
        current.append(row)
        count += num
    if current:
        groups.append(current)
    return [torch.tensor(g, device=counts.device) for g in groups]


def obs_update(
    weight: torch.Tensor, prune: torch.Tensor, curvature: Curvature, config: LLMSurgeonConfig
) -> torch.Tensor:
    """Live part of `weight` after removing `prune` (bool [out, in]) with the K-FAC OBS
    update; returns the new live block [live out, live in] (float32), pruned entries 0."""
    g_inv, a_inv = curvature.g_inv, curvature.a_inv
    w = weight[curvature.rows][:, curvature.cols].float()
    removed = prune[curvature.rows][:, curvature.cols]
    errors = torch.zeros_like(w)
    for rows in row_groups(removed.sum(1), config.max_correlate):
        local_r, cols = removed[rows].nonzero(as_tuple=True)
        r = rows[local_r]
        values = w[r, cols] + errors[r, cols] if config.add_update else w[r, cols]
        joint = g_inv[r][:, r] * a_inv[cols][:, cols]
        solved = torch.zeros(len(rows), w.shape[1], dtype=w.dtype, device=w.device)
        solved[local_r, cols] = torch.linalg.solve(joint, values)
        errors -= g_inv[:, rows] @ (solved @ a_inv)
    w += errors
    w[removed] = 0
    return w


def nm_prune(costs: dict[str, torch.Tensor], pattern: Pattern, share: float) -> dict:
    """Removed positions (True) under N:M: the `share` of all m-groups with the lowest cost
    (sum of their m − n cheapest weights) lose those m − n weights."""
    drop = pattern.m - pattern.n
    group_costs, order = {}, {}
    for name, c in costs.items():
        groups = c.reshape(-1, pattern.m)
        cheapest, idx = torch.topk(groups, drop, dim=1, largest=False)
        group_costs[name] = cheapest.sum(1)
        order[name] = idx
    kept_groups = global_masks(group_costs, share)
    pruned = {}
    for name, c in costs.items():
        groups = torch.zeros(c.numel() // pattern.m, pattern.m, dtype=torch.bool, device=c.device)
        groups.scatter_(1, order[name], True)
        groups &= ~kept_groups[name].unsqueeze(1)
        pruned[name] = groups.view_as(c)
    return pruned


@register
class LLMSurgeon(Method):
    name = "llm_surgeon"
    summary = "K-FAC curvature, one global threshold, correlated OBS updates, over many shots"
    Config = LLMSurgeonConfig
    no_allocation = "llm_surgeon sets each layer's sparsity by its global threshold"
    sparsity_meaning = "share of the weights of all pruned linears zeroed (layers differ)"

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        if calib is None:
            raise PrunekitError("method 'llm_surgeon' needs calibration data")
        config, adapter, pattern = self.config, lm.adapter, request.pattern
        if pattern.is_nm:
            for i, block in enumerate(adapter.blocks):
                for path, module in adapter.linears(block).items():
                    if weight_matrix(module).shape[1] % pattern.m:
                        raise PrunekitError(
                            f"{i}.{path} has {weight_matrix(module).shape[1]} inputs, "
                            f"not a multiple of {pattern.m} ({pattern})"
                        )
        final = pattern.sparsity if pattern.is_nm else request.sparsity
        losses = []
        for shot in tqdm(range(1, config.shots + 1), desc="llm_surgeon shots"):
            share = shot / config.shots
            losses.append(self._shot(lm, calib, request, share * final, share))
        return {"llm_surgeon": {"shots": config.shots, "calibration_loss": losses}}

    @torch.no_grad()
    def _shot(
        self,
        lm: LoadedModel,
        calib: torch.Tensor,
        request: PruneRequest,
        sparsity: float,
        group_share: float,
    ) -> float:
        """One round: curvature, global selection at `sparsity` (N:M: `group_share` of the
        groups), OBS updates; returns the calibration loss before the round."""
        adapter, config, device = lm.adapter, self.config, request.device
        modules = {
            f"{i}.{path}": module
            for i, block in enumerate(adapter.blocks)
            for path, module in adapter.linears(block).items()
        }
        curvature, costs = {}, {}

        def on_block(index: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
            for path, (a, g) in factors.items():
                name = f"{index}.{path}"
                weight = weight_matrix(modules[name])
                w = weight.to(device, torch.float32)
                curvature[name] = Curvature.build(w, a.to(device), g.to(device), config)
                weight.copy_(w.to(weight.device, weight.dtype))  # dead rows and columns
                costs[name] = curvature[name].costs(w).cpu()

        with torch.enable_grad():
            loss = kfac_factors(adapter, calib, on_block, device, request.batch_size)
        if request.pattern.is_nm:
            pruned = nm_prune(costs, request.pattern, group_share)
        else:
            pruned = {k: ~m for k, m in global_masks(costs, sparsity).items()}
        for name in tqdm(list(modules), desc="OBS updates", leave=False):
            weight = weight_matrix(modules[name])
            c = curvature.pop(name)
            w = weight.to(device, torch.float32)
            live = obs_update(w, pruned[name].to(device), c, config)
            w[c.rows.nonzero(), c.cols.nonzero().T] = live
            weight.copy_(w.to(weight.device, weight.dtype))
        return loss
