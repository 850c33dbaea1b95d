"""OWL (Yin et al., ICML 2024): outlier-weighted layer-wise sparsity.

A dense sequential pass scores every weight of a block with Wanda's |W_ij| · ‖X_j‖₂;
the block's outlier ratio D is the share of those scores above `m` × their mean (over all
linears of the block together). Blocks with more outliers are pruned less. The default
mapping is the reference's (`lib/prune_all.py`): D is min-max scaled to span exactly 2·lam,

    s_l = s - (A_l - mean A),   A_l = 2·lam · (D_l - min D) / (max D - min D)

so the ratios span 2·lam with mean s (they can leave [s - lam, s + lam] when D is skewed).
`mapping=bounded` keeps the same order and mean but bounds the deviation by lam:

    s_l = s - lam · (D_l - mean D) / max_k |D_k - mean D|
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from prunekit.allocations.base import Allocated, Allocation, AllocationConfig, register_allocation
from prunekit.engine.runner import SequentialRunner
from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import PruneRequest
from prunekit.models.adapter import ModelAdapter, weight_matrix
from prunekit.models.loading import LoadedModel


@dataclass
class OWLConfig(AllocationConfig):
    m: float = 5.0  # outlier threshold, in multiples of the block's mean Wanda score
    lam: float = 0.08  # half the span of the block sparsities (minmax) / their bound (bounded)
    mapping: str = "minmax"  # outlier ratios -> sparsities: minmax (reference) or bounded


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all entries of `scores` (any shapes) above m × their common mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


@torch.no_grad()
def block_outlier_ratios(
    adapter: ModelAdapter,
    calib: torch.Tensor,
    m: float,
    device: str,
    batch_size: int,
    compute_dtype: str = "auto",
) -> list[float]:
    """Outlier ratio of each block's Wanda scores, from a dense sequential pass."""
    runner = SequentialRunner(
        adapter,
        calib,
        device=device,
        batch_size=batch_size,
        propagate="dense",
        progress="owl",
        collect=("input_norm",),
        compute_dtype=compute_dtype,
    )  # dense: statistics and outputs come from one pass per block
    ratios = []
    for ctx in runner:
        scores = [
            weight_matrix(module).float().abs() * ctx.stats[path]["input_norm"].unsqueeze(0)
            for path, module in ctx.linears().items()
        ]
        ratios.append(outlier_ratio(scores, m))
    return ratios


MAPPINGS = ("minmax", "bounded")


def owl_ratios(
    outliers: list[float], sparsity: float, lam: float, mapping: str = "minmax"
) -> list[float]:
    """Per-block sparsities with mean s; more outliers, less sparsity (see the module doc)."""
    d = torch.tensor(outliers, dtype=torch.float64)
    if mapping == "minmax":
        span = d.max() - d.min()
        if span == 0:
            return [sparsity] * len(outliers)
        scaled = (d - d.min()) / span * (2 * lam)
        return (sparsity - (scaled - scaled.mean())).tolist()
    deviation = d - d.mean()
    spread = deviation.abs().max()
    if spread == 0:
        return [sparsity] * len(outliers)
    ratios = sparsity - lam * deviation / spread
    ratios -= ratios.mean() - sparsity  # remove float drift: mean exactly s
    return ratios.clamp(sparsity - lam, sparsity + lam).tolist()


def _fingerprint(adapter: ModelAdapter, calib: torch.Tensor) -> str:
    """Identifies (weights, calibration windows) so outlier ratios can be reused."""
    digest = hashlib.sha256(calib.numpy().tobytes())
    if adapter.offload is not None:  # blocks on disk: the checkpoint files identify them
        for file in sorted(set(adapter.offload.files.values())):
            digest.update(f"{file}|{file.stat().st_size}|{file.stat().st_mtime_ns}".encode())
        return digest.hexdigest()
    for block in adapter.blocks:
        for module in adapter.linears(block).values():
            w = weight_matrix(module)
            digest.update(f"{float(w.abs().sum()):.6e}|{float(w.sum()):.6e}".encode())
    return digest.hexdigest()


@register_allocation
class OWL(Allocation):
    name = "owl"
    summary = "outlier-weighted layer-wise sparsity (owl:m=5,lam=0.08)"
    Config = OWLConfig
    needs_calibration = True
    aliases = {"lambda": "lam"}

    def __init__(self, config: OWLConfig | None = None):
        super().__init__(config)
        self._cache: dict[str, list[float]] = {}  # fingerprint -> outlier ratios

    def allocate(
        self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest
    ) -> Allocated:
        cfg, s = self.config, request.sparsity
        if calib is None:
            raise PrunekitError("allocation owl needs calibration windows")
        if cfg.m <= 0 or cfg.lam < 0:
            raise PrunekitError(f"owl needs m > 0 and lam >= 0, got m={cfg.m}, lam={cfg.lam}")
        if cfg.mapping not in MAPPINGS:
            raise choice_error("owl mapping", cfg.mapping, MAPPINGS)
        if s - cfg.lam < 0 or s + cfg.lam >= 1:
            raise PrunekitError(
                f"owl with lam={cfg.lam} needs sparsity in [{cfg.lam}, {1 - cfg.lam}), got {s}"
            )
        key = _fingerprint(lm.adapter, calib) + f"|{cfg.m}|{request.compute_dtype}"
        if key not in self._cache:
            self._cache[key] = block_outlier_ratios(
                lm.adapter,
                calib,
                cfg.m,
                request.device,
                request.batch_size,
                request.compute_dtype,
            )
        outliers = self._cache[key]
        ratios = owl_ratios(outliers, s, cfg.lam, cfg.mapping)
        if not all(0.0 <= r < 1.0 for r in ratios):
            raise PrunekitError(
                f"owl (minmax, lam={cfg.lam}) at sparsity {s} gives block sparsities "
                f"{min(ratios):.3f}..{max(ratios):.3f} outside [0, 1); lower lam"
            )
        return Allocated(ratios, {"outlier_ratios": outliers, "mapping": cfg.mapping})
