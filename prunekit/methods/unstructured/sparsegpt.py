"""SparseGPT (Frantar & Alistarh, ICML 2023): OBS pruning with lazy block updates.

Columns are visited left to right in blocks of `blocksize`; inside a block the mask is
chosen adaptively by w² / [H⁻¹]²_jj and each pruned weight's error is spread over the
remaining columns through the upper Cholesky factor of H⁻¹. By default (scope "layer",
as IST-DASLab/sparsegpt does) one threshold covers all rows of a column block, so each
block loses its share of rows x blocksize weights; scope "row" prunes the share of every
row of the block instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine.runner import LayerStats
from prunekit.methods.base import MethodConfig, register
from prunekit.methods.unstructured.layerwise import LayerwiseMethod
from prunekit.models.adapter import set_weight_matrix, weight_matrix
from prunekit.surgery.masks import Target, prune_count

_TILE = 16  # columns swept one by one before a matrix update of the rest of the block


@dataclass
class SparseGPTConfig(MethodConfig):
    blocksize: int = 128  # columns per lazy update block
    percdamp: float = 0.01  # damping, as a fraction of mean(diag(H))

    ranges = {"blocksize": ">= 1", "percdamp": "> 0"}


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with U ᵀU = (H + λI)⁻¹; returns (U, percdamp used).

    When the Cholesky fails, the damping is multiplied by 10 (up to 5 times) with a warning.
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = torch.diag(hessian).mean().clamp_min(1e-12)
    damp = percdamp
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper, damp
        warnings.warn(
            f"Cholesky of the Hessian failed at damping {damp:g}; retrying with {damp * 10:g}",
            stacklevel=2,
        )
        damp *= 10
    raise RuntimeError("Hessian is not positive definite even with damping 1e5 x percdamp")


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Copy H, giving dead inputs (H_jj = 0) a unit diagonal; their weights are zeroed."""
    hessian = hessian.clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    return hessian


def _block_prune_counts(target: Target, rows: int, i1: int, i2: int) -> int:
    """Weights to prune in columns [i1, i2): per row (row scope) or in total (layer scope)."""
    scale = 1 if target.scope == "row" else rows
    return prune_count(scale * i2, target.sparsity) - prune_count(scale * i1, target.sparsity)


def _block_mask(scores: torch.Tensor, target: Target, count: int) -> torch.Tensor:
    """Pruned positions (True) of one column block from OBS scores [rows, cols]."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return pruned
    if target.scope == "row":
        idx = torch.topk(scores, count, dim=1, largest=False).indices
        return pruned.scatter_(1, idx, True)
    idx = torch.topk(scores.flatten(), count, largest=False).indices
    return pruned.view(-1).index_fill_(0, idx, True).view_as(scores)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    blocksize: int,
    percdamp: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Pruned and updated copy of `weight` [out, in] given H [in, in]; also the damping used.

    With `mask` [out, in] (True = kept) the pruned positions are given rather than chosen
    and only the OBS update runs (weights of dead inputs are then left as they are).
    """
    w = weight.float().clone()
    rows, cols = w.shape
    scratch = w if mask is None else w.clone()
    upper, damp = inverse_hessian_factor(prepare_hessian(hessian.float(), scratch), percdamp)
    n, m = target.pattern.n, target.pattern.m
    if m:
        blocksize = max(m, blocksize // m * m)
    tile = max(m, _TILE // m * m) if m else _TILE
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        diag = torch.diag(u1)
        err = torch.zeros_like(w1)
        if mask is not None:
            pruned = ~mask[:, i1:i2]
        elif m:
            pruned = torch.zeros_like(w1, dtype=torch.bool)
        else:
            count = _block_prune_counts(target, rows, i1, i2)
            pruned = _block_mask(w1.pow(2) / diag.pow(2), target, count)
        scale = pruned / diag  # [rows, block]: 1 / [H⁻¹]_jj where pruned, else 0
        # the sweep, tile by tile: a column's error updates its own tile at once and the
        # rest of the block after the tile (the lazy update of SparseGPT, applied twice)
        for j1 in range(0, i2 - i1, tile):
            j2 = min(j1 + tile, i2 - i1)
            for i in range(j1, j2):
                if m and mask is None and i % m == 0:
                    group = w1[:, i : i + m].pow(2) / diag[i : i + m].pow(2)
                    drop = torch.topk(group, m - n, dim=1, largest=False).indices
                    pruned[:, i : i + m].scatter_(1, drop, True)
                    scale[:, i : i + m] = pruned[:, i : i + m] / diag[i : i + m]
                torch.mul(w1[:, i], scale[:, i], out=err[:, i])
                # column i becomes its kept part (pruned entries reach zero up to rounding)
                w1[:, i:j2].addr_(err[:, i], u1[i, i:j2], alpha=-1)
            w1[:, j2:].addmm_(err[:, j1:j2], u1[j1:j2, j2:], alpha=-1)
        w[:, i1:i2] = w1.masked_fill_(pruned, 0)
        w[:, i2:].addmm_(err, upper[i1:i2, i2:], alpha=-1)
    return w, damp


@register
class SparseGPT(LayerwiseMethod):
    name = "sparsegpt"
    summary = "OBS mask selection with weight reconstruction from the Hessian XᵀX"
    needs = ("hessian",)
    default_scope = "layer"
    Config = SparseGPTConfig

    def prune_linear(self, module: nn.Module, stats: LayerStats, target: Target, path: str) -> None:
        weight = weight_matrix(module)
        new, _ = sparsegpt_prune(
            weight, stats["hessian"], target, self.config.blocksize, self.config.percdamp
        )
        set_weight_matrix(module, new)
