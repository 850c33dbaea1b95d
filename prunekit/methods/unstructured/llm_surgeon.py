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

`structure=rows_columns` is the paper's structured variant (the reference's
`--structures row column`): whole rows and columns of each linear are removed, a row
costing 0.5·wᵢ A wᵢᵀ / [G⁻¹]_ii and a column 0.5·wⱼᵀ G wⱼ / [A⁻¹]_jj; one threshold over
all linears removes the share `sparsity` of their weights (a row and a column share one
weight), and the OBS update for the chosen rows R and columns C is
ΔW = −G⁻¹[:, R] (G⁻¹[R, R])⁻¹ W[R] then −W[:, C] (A⁻¹[C, C])⁻¹ A⁻¹[C, :]. The reference's
structured script runs 40 shots with both dampings 0.01; the rows and columns are zeroed,
not cut out of the model.

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
from prunekit.surgery.masks import Pattern, check_nm_width, global_masks

STRUCTURES = ("element", "rows_columns")


@dataclass
class LLMSurgeonConfig(MethodConfig):
    shots: int = 0  # rounds, the target rising linearly; 0: 20 (element), 40 (rows_columns)
    max_correlate: int = 2000  # element: removed weights solved jointly (whole rows); 0: all
    damp_g: float = 0.0  # damping of G as a fraction of mean(diag); 0: 0.1 / 0.01
    damp_a: float = 0.01  # damping of A, as a fraction of mean(diag(A))
    add_update: bool = True  # each row group starts from the earlier groups' updates
    structure: str = "element"  # element | rows_columns (whole rows and columns)

    ranges = {"shots": ">= 0", "max_correlate": ">= 0", "damp_g": ">= 0", "damp_a": "> 0"}

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            valid = ", ".join(STRUCTURES)
            raise PrunekitError(f"llm_surgeon structure {self.structure!r}; valid: {valid}")
        rows_columns = self.structure == "rows_columns"
        self.shots = self.shots or (40 if rows_columns else 20)
        self.damp_g = self.damp_g or (0.01 if rows_columns else 0.1)


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
    g: torch.Tensor  # [live out, live out]
    a: torch.Tensor  # [live in, live in]
    g_inv: torch.Tensor  # damped inverse of g
    a_inv: torch.Tensor  # damped inverse of a

    @classmethod
    def build(
        cls, weight: torch.Tensor, a: torch.Tensor, g: torch.Tensor, config: LLMSurgeonConfig
    ) -> Curvature:
        """Zero the dead rows and columns of `weight` [out, in] (in place) and invert."""
        rows = weight.ne(0).any(1) & g.diagonal().ne(0)
        cols = weight.ne(0).any(0) & a.diagonal().ne(0)
        weight[~rows] = 0
        weight[:, ~cols] = 0
        g, a = g[rows][:, rows], a[cols][:, cols]
        g_inv, a_inv = damped_inverse(g, config.damp_g), damped_inverse(a, config.damp_a)
        return cls(rows, cols, g, a, g_inv, a_inv)

    def live(self, weight: torch.Tensor) -> torch.Tensor:
        """The live block of `weight` [out, in] as float32 [live out, live in]."""
        return weight[self.rows][:, self.cols].float()

    def set_live(self, weight: torch.Tensor, block: torch.Tensor) -> None:
        weight[self.rows.nonzero(), self.cols.nonzero().T] = block.to(weight.dtype)

    def costs(self, weight: torch.Tensor) -> torch.Tensor:
        """OBS removal costs [out, in]: 0.5·W² / ([G⁻¹]_ii [A⁻¹]_jj); 0 where dead."""
        live = self.live(weight)
        costs = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        inner = 0.5 * live.square() / torch.outer(self.g_inv.diagonal(), self.a_inv.diagonal())
        self.set_live(costs, inner)
        return costs

    def line_costs(self, weight: torch.Tensor) -> torch.Tensor:
        """OBS costs of whole rows then whole columns, [out + in] (0 where dead)."""
        live = self.live(weight)
        costs = torch.zeros(sum(weight.shape), dtype=torch.float32, device=weight.device)
        row = 0.5 * ((live @ self.a) * live).sum(1) / self.g_inv.diagonal()
        col = 0.5 * ((self.g @ live) * live).sum(0) / self.a_inv.diagonal()
        costs[: weight.shape[0]][self.rows] = row
        costs[weight.shape[0] :][self.cols] = col
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
    w = curvature.live(weight)
    removed = prune[curvature.rows][:, curvature.cols]
    errors = torch.zeros_like(w)
    for rows in row_groups(removed.sum(1), config.max_correlate):
        local_r, cols = removed[rows].nonzero(as_tuple=True)
        r = rows[local_r]
        values = w[r, cols] + errors[r, cols] if config.add_update else w[r, cols]
        # [G⁻¹ ⊗ A⁻¹]_QQ, symmetric positive definite (a Hadamard product of SPD blocks)
        counts = torch.bincount(local_r, minlength=len(rows))
        g_part = g_inv[rows][:, rows].repeat_interleave(counts, 0).repeat_interleave(counts, 1)
        joint = g_part * a_inv.index_select(0, cols).index_select(1, cols)
        step = torch.cholesky_solve(values.unsqueeze(1), torch.linalg.cholesky(joint))
        solved = torch.zeros(len(rows), w.shape[1], dtype=w.dtype, device=w.device)
        solved[local_r, cols] = step.squeeze(1)
        errors -= g_inv[:, rows] @ (solved @ a_inv)
    w += errors
    w[removed] = 0
    return w


def line_update(
    weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, curvature: Curvature
) -> torch.Tensor:
    """Live part of `weight` after removing whole `rows` [out] and `cols` [in] (bool):
    all rows in one OBS step through G⁻¹, then all columns through A⁻¹, each starting
    from the earlier step's update (the reference's structured `addupdate` path)."""
    g_inv, a_inv = curvature.g_inv, curvature.a_inv
    w = curvature.live(weight)
    r = rows[curvature.rows].nonzero().flatten()
    c = cols[curvature.cols].nonzero().flatten()
    if len(r):
        w -= g_inv[:, r] @ torch.linalg.solve(g_inv[r][:, r], w[r])
        w[r] = 0
    if len(c):
        w -= torch.linalg.solve(a_inv[c][:, c], w[:, c].T).T @ a_inv[c]
    w[:, c] = 0
    return w


def line_prune(
    costs: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], sparsity: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rows and columns (bool [out], [in]) to remove: the longest prefix of all linears'
    rows and columns by increasing cost that removes at most `sparsity` of their weights
    (r rows and c columns of an [out, in] matrix remove r·in + c·out − r·c weights)."""
    losses, gains = [], []
    for name, c in costs.items():
        out, inp = shapes[name]
        order = torch.argsort(c, stable=True)
        is_row = (order < out).double()
        r, k = is_row.cumsum(0), (1 - is_row).cumsum(0)
        removed = r * inp + k * out - r * k
        losses.append(c[order].double())
        gains.append(torch.diff(removed, prepend=removed.new_zeros(1)))
    everything = torch.cat(losses)
    order = torch.argsort(everything, stable=True)
    total = torch.cat(gains)[order].cumsum(0)
    budget = int(sparsity * sum(o * i for o, i in shapes.values()))
    taken = torch.zeros_like(everything, dtype=torch.bool)
    taken[order[: int((total <= budget).sum())]] = True
    out, offset = {}, 0
    for name, c in costs.items():
        mine = torch.zeros_like(c, dtype=torch.bool)
        mine[torch.argsort(c, stable=True)] = taken[offset : offset + c.numel()]
        offset += c.numel()
        rows = shapes[name][0]
        out[name] = (mine[:rows], mine[rows:])
    return out


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
        if pattern.is_nm:  # before the first backward pass, not after it
            for i, block in enumerate(adapter.blocks):
                for path, module in adapter.linears(block).items():
                    check_nm_width(weight_matrix(module).shape[1], pattern.m, f"{i}.{path}")
        if pattern.is_nm and config.structure != "element":
            raise PrunekitError(f"llm_surgeon structure {config.structure!r} takes no {pattern}")
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
        curvature, costs, shapes = {}, {}, {}
        lines = config.structure == "rows_columns"

        def on_block(index: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
            for path, (a, g) in factors.items():
                name = f"{index}.{path}"
                weight = weight_matrix(modules[name])
                w = weight.to(device, torch.float32)
                curvature[name] = c = Curvature.build(w, a.to(device), g.to(device), config)
                weight.copy_(w.to(weight.device, weight.dtype))  # dead rows and columns
                costs[name] = (c.line_costs(w) if lines else c.costs(w)).cpu()
                shapes[name] = tuple(w.shape)

        with torch.enable_grad():
            loss = kfac_factors(adapter, calib, on_block, device, request.batch_size)
        if lines:
            removed = line_prune(costs, shapes, sparsity)
        elif request.pattern.is_nm:
            removed = nm_prune(costs, request.pattern, group_share)
        else:
            removed = {k: ~m for k, m in global_masks(costs, sparsity).items()}
        for name in tqdm(list(modules), desc="OBS updates", leave=False):
            weight = weight_matrix(modules[name])
            c = curvature.pop(name)
            w = weight.to(device, torch.float32)
            if lines:
                rows, cols = (x.to(device) for x in removed[name])
                c.set_live(w, line_update(w, rows, cols, c))
            else:
                c.set_live(w, obs_update(w, removed[name].to(device), c, config))
            weight.copy_(w.to(weight.device, weight.dtype))
        return loss
