"""Bonsai's importance regression: a linear model of sub-model performance on the keep
masks, fitted by Adam with an L1 penalty, its learning rate, penalty and batch size chosen
by 5-fold cross-validated Kendall tau (the reference's `ScoreModelHP`).

`fit_l1(keep [samples, units], perf [samples])` returns one coefficient per unit; larger
means keeping the unit raises performance more.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

LR_FACTORS = (100.0, 10.0, 1.0, 0.1)  # learning rate = 1 / (active units * factor)
PENALTIES = (1e2, 1e-4, 0.0)  # L1 weight
BATCH_SIZES = (32, 64, 128)
FOLDS = 5
PATIENCE = 10  # epochs without a better validation tau before stopping


@dataclass(frozen=True)
class FitSettings:
    lr_factor: float
    penalty: float
    batch_size: int


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau-b of two [n] vectors (NaN when either is constant)."""
    da = torch.sign(a[:, None] - a[None, :]).double()
    db = torch.sign(b[:, None] - b[None, :]).double()
    upper = torch.ones_like(da, dtype=torch.bool).triu(1)
    da, db = da[upper], db[upper]
    denominator = math.sqrt(float(da.abs().sum()) * float(db.abs().sum()))
    return float((da * db).sum()) / denominator if denominator > 0 else float("nan")


def train_linear(
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor],
    settings: FitSettings,
    epochs: int,
    generator: torch.Generator,
) -> tuple[float, torch.Tensor]:
    """Fit `perf ≈ keep @ w + b` on `train`, keeping the epoch with the best Kendall tau on
    `valid`; returns (that tau, its w [units]). Targets are centred by the train mean."""
    (x, y), (vx, vy) = train, valid
    mean = y.mean()
    y, vy = y - mean, vy - mean
    weight = torch.zeros(x.shape[1], dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float32, requires_grad=True)
    active = max(int(x.mean(0).count_nonzero()), 1)
    optimizer = torch.optim.Adam([weight, bias], lr=1.0 / (active * settings.lr_factor))
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=3, min_lr=1e-5
    )
    best_tau, best, since_best = -1e5, weight.detach().clone(), 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for batch in order.split(settings.batch_size):
            loss = torch.nn.functional.mse_loss(x[batch] @ weight + bias, y[batch])
            loss = loss + settings.penalty * weight.abs().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            tau = kendall_tau(vx @ weight + bias, vy)
        if tau >= best_tau:  # False for NaN, as in the reference
            best_tau, best, since_best = tau, weight.detach().clone(), 0
        schedule.step(tau)
        since_best += 1
        if since_best > PATIENCE:
            break
    return best_tau, best


def fit_l1(
    keep: torch.Tensor, perf: torch.Tensor, epochs: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict]:
    """Coefficients [units] of the linear model of `perf` [samples] on `keep` [samples,
    units] (0/1), with the settings of best mean validation tau over contiguous folds;
    also the chosen settings and their tau."""
    x, y = keep.float(), perf.float()
    n = len(y)
    fold = n // FOLDS
    best_tau, best_settings = float("-inf"), None
    for lr_factor, penalty, batch_size in itertools.product(LR_FACTORS, PENALTIES, BATCH_SIZES):
        settings = FitSettings(lr_factor, penalty, batch_size)
        taus = []
        for k in range(FOLDS):
            held = torch.zeros(n, dtype=torch.bool)
            held[k * fold : (k + 1) * fold] = True
            split = (x[~held], y[~held]), (x[held], y[held])
            taus.append(train_linear(*split, settings, epochs, generator)[0])
        tau = sum(taus) / len(taus)
        if tau > best_tau:
            best_tau, best_settings = tau, settings
    settings = best_settings or FitSettings(LR_FACTORS[0], PENALTIES[0], BATCH_SIZES[0])
    _, coefficients = train_linear((x, y), (x, y), settings, epochs, generator)
    facts = {
        "lr_factor": settings.lr_factor,
        "l1": settings.penalty,
        "fit_batch": settings.batch_size,
        "cv_kendall_tau": round(best_tau, 4) if math.isfinite(best_tau) else None,
    }
    return coefficients, facts


def fit_ridge(keep: torch.Tensor, perf: torch.Tensor, penalty: float) -> torch.Tensor:
    """Closed-form ridge coefficients [units] of `perf` on `keep` (both centred)."""
    x = keep.double() - keep.double().mean(0)
    y = perf.double() - perf.double().mean()
    gram = x.t() @ x + penalty * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.t() @ y).float()
