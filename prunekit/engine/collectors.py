"""Statistics of a linear layer's inputs, gathered by forward hooks during calibration.

Each collector sees the layer input as X [tokens, in_features] batch after batch and
keeps a running statistic; `result()` gives the final tensor. Methods ask for
collectors by name (`COLLECTORS`).
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Collector:
    """Base: a running statistic of a layer's inputs X [tokens, in_features]."""

    name: ClassVar[str]

    def __init__(self, in_features: int, device: torch.device):
        self.in_features = in_features
        self.device = device
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        raise NotImplementedError


class InputNorm(Collector):
    """‖X_j‖₂ over all calibration tokens, per input column: [in_features]."""

    name = "input_norm"

    def __init__(self, in_features: int, device: torch.device):
        super().__init__(in_features, device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        self.sq_sum += x.double().pow(2).sum(0)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


class Hessian(Collector):
    """H = (2 / tokens) · XᵀX, the Hessian of the layer's squared error: [in, in]."""

    name = "hessian"

    def __init__(self, in_features: int, device: torch.device):
        super().__init__(in_features, device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


class _Moments(Collector):
    """Running first and second moments per input channel (float64)."""

    def __init__(self, in_features: int, device: torch.device):
        super().__init__(in_features, device)
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_total = torch.zeros(in_features, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        self.total += x.sum(0)
        self.sq_total += x.pow(2).sum(0)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)


class InputMean(_Moments):
    """Mean of each input channel over calibration tokens: [in_features]."""

    name = "input_mean"

    def result(self) -> torch.Tensor:
        return self.mean().float()


class InputVariance(_Moments):
    """Sample variance of each input channel over calibration tokens: [in_features]."""

    name = "input_variance"

    def result(self) -> torch.Tensor:
        n = max(self.tokens, 2)
        var = (self.sq_total - self.total.pow(2) / n) / (n - 1)
        return var.clamp_min(0).float()


COLLECTORS: dict[str, type[Collector]] = {
    c.name: c for c in (InputNorm, Hessian, InputMean, InputVariance)
}
