"""Mask making from importance scores: per row, per layer, N:M, global.

Convention: a score is "importance" (higher = keep); a mask is a bool tensor of the
weight's shape [out, in] with True = kept. N:M follows NVIDIA: "2:4" keeps 2 of every 4
consecutive input weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError

SCOPES = ("row", "layer")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured (n = m = 0) or N:M (keep n of every m)."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """`"unstructured"`, or `"N:M"` with 0 < N < M (e.g. `"2:4"`)."""
        if text == "unstructured":
            return cls()
        parts = text.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise PrunekitError(f"unknown pattern {text!r}; valid: unstructured, or N:M like 2:4")
        n, m = (int(p) for p in parts)
        if not 0 < n < m:
            raise PrunekitError(f"pattern {text!r} needs 0 < N < M (N kept of every M)")
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies, or None when unstructured."""
        return 1 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


@dataclass(frozen=True)
class Target:
    """What one layer must become: a sparsity, a pattern and a scope (row or layer)."""

    sparsity: float
    pattern: Pattern = Pattern()
    scope: str = "row"


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise PrunekitError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def prune_count(total: int, sparsity: float) -> int:
    """How many of `total` weights to zero at `sparsity` (rounded to nearest)."""
    return int(round(total * sparsity))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest scores of each row: exactly round(in · sparsity) zeros per row."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest scores of the whole matrix: exactly round(numel · sparsity) zeros."""
    k = prune_count(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        drop = torch.topk(scores.flatten(), k, largest=False).indices
        mask[drop] = False
    return mask.view_as(scores)


def check_nm_width(in_features: int, m: int, where: str = "") -> None:
    """Refuse an N:M pattern whose group size m does not divide `in_features`."""
    if in_features % m:
        at = f" ({where})" if where else ""
        raise PrunekitError(
            f"N:M with M={m} needs in_features divisible by {m}, got {in_features}{at}"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores along each row (in % m == 0)."""
    out_features, in_features = scores.shape
    check_nm_width(in_features, m)
    groups = scores.reshape(out_features, in_features // m, m)
    keep = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return mask.reshape(out_features, in_features)


def make_mask(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """The mask a Target asks for, from importance scores [out, in]."""
    if target.pattern.is_nm:
        return nm_mask(scores, target.pattern.n, target.pattern.m)
    if target.scope == "layer":
        return layer_mask(scores, target.sparsity)
    return row_mask(scores, target.sparsity)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all matrices: exactly round(total · sparsity) zeros overall."""
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    k = prune_count(flat.numel(), sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, largest=False).indices] = False
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view_as(s)
        offset += s.numel()
    return masks


def sparsity_of(weight: torch.Tensor) -> float:
    """Share of exact zeros in a tensor."""
    return float((weight == 0).sum()) / weight.numel()


def is_valid_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row has <= n nonzeros."""
    groups = (weight != 0).reshape(weight.shape[0], -1, m)
    return bool((groups.sum(2) <= n).all())
