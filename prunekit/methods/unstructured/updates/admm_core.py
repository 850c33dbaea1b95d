"""ADMM helpers shared by the ADMM update (Boža 2024), its gradual variant and ALPS
(Meng et al. 2024): the normalised layer least-squares problem, (H + ρI)⁻¹ for any ρ,
the ADMM loop with pluggable mask and ρ rules, and a PCG solve on a fixed support.

All tensors here live in the normalised space of `LayerProblem`: columns are scaled by
√H_jj, so H has a unit diagonal (plus damping), ρ is scale-free, and |W̃_ij| = |W_ij|·‖X_j‖
up to a constant (a Wanda-style importance).

ADMM (scaled form) for  min ½ tr((W − W₀) H (W − W₀)ᵀ)  s.t.  W = Z,  Z in the mask set:
    W ← (W₀H + ρ(Z − U)) (H + ρI)⁻¹      closed form, rows are independent
    Z ← Π_mask(W + U)                      projection: zero outside the (re)chosen mask
    U ← U + W − Z                          dual update
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError


def check_penalty(owner: str, rho: float, damp: float) -> None:
    """Fail unless the ADMM penalty ρ > 0 and the ridge `damp` >= 0 (`owner`: whose options)."""
    if rho <= 0 or damp < 0:
        raise PrunekitError(f"{owner} needs rho > 0 and damp >= 0, got {rho}, {damp}")


@dataclass
class LayerProblem:
    """min over Ŵ of trace((Ŵ − W₀) H (Ŵ − W₀)ᵀ), normalised.

    `hessian` [in, in] has a unit diagonal plus `damp`; `plain` is the same without
    damping (for reporting); `dense` is W₀·scale [out, in]; `target` = W₀ H [out, in].
    """

    hessian: torch.Tensor
    plain: torch.Tensor
    dense: torch.Tensor
    target: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def build(cls, weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> LayerProblem:
        """From W₀ [out, in] and H [in, in] (any positive scale); `damp` is added to the
        normalised H's unit diagonal (the ADMM update's convention).

        A dead input (H_jj = 0, never active on the calibration data) gets H_jj = 1 for
        the solves and a zero weight, as the references' √H_jj + ε scaling makes it: its
        weights score lowest, so they never win a kept slot from a live input.
        """
        h = hessian.double().clone()
        diag = torch.diagonal(h)
        dead = diag <= 0
        h[dead, :] = 0
        h[:, dead] = 0
        diag[dead] = 1
        scale = diag.sqrt()
        plain = (h / scale.unsqueeze(0) / scale.unsqueeze(1)).float()
        damped = plain + damp * torch.eye(plain.shape[0], dtype=plain.dtype, device=plain.device)
        dense = weight.float() * scale.float().unsqueeze(0)
        dense[:, dead] = 0
        return cls(damped, plain, dense, dense @ damped, scale.float())

    @classmethod
    def build_damped_first(
        cls, weight: torch.Tensor, hessian: torch.Tensor, damp: float
    ) -> LayerProblem:
        """ALPS's convention: add `damp`·mean(diag H) to H's diagonal, then scale columns by
        √diag + 1e-8 (a dead input keeps a small weight, W_j·√damp)."""
        h = hessian.double().clone()
        plain_diag = torch.diagonal(h).clone()
        torch.diagonal(h).add_(damp * float(plain_diag.mean()))
        scale = torch.diagonal(h).sqrt() + 1e-8
        damped = (h / scale.unsqueeze(0) / scale.unsqueeze(1)).float()
        plain = (
            (h - torch.diag(torch.diagonal(h) - plain_diag))
            / scale.unsqueeze(0)
            / scale.unsqueeze(1)
        ).float()
        dense = weight.float() * scale.float().unsqueeze(0)
        return cls(damped, plain, dense, dense @ damped, scale.float())

    def restore(self, weight: torch.Tensor) -> torch.Tensor:
        """Back from the normalised space: [out, in] in the layer's own units."""
        return weight / self.scale.unsqueeze(0)

    def error(self, weight: torch.Tensor) -> float:
        """Relative reconstruction error trace(ΔW H ΔWᵀ) / trace(W₀ H W₀ᵀ) (undamped H)."""
        delta = weight - self.dense
        total = float(((self.dense @ self.plain) * self.dense).sum())
        return float(((delta @ self.plain) * delta).sum()) / max(total, 1e-30)


class PenalisedInverse:
    """(H + ρI)⁻¹ for the ρ values an ADMM run asks for, [in, in].

    The first ρ costs one Cholesky factorisation; when ρ changes (a ρ schedule), one
    eigendecomposition H = QΛQᵀ is made and reused: (H + ρI)⁻¹ = Q diag(1/(λ + ρ)) Qᵀ.
    """

    def __init__(self, hessian: torch.Tensor):
        self.hessian = hessian
        self.rho: float | None = None
        self.inverse: torch.Tensor | None = None
        self.eigen: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, rho: float) -> torch.Tensor:
        if rho == self.rho:
            return self.inverse
        h = self.hessian.double()
        if self.inverse is None:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(h + rho * eye))
        else:
            if self.eigen is None:
                self.eigen = torch.linalg.eigh(h)
            values, vectors = self.eigen
            inverse = (vectors / (values + rho).unsqueeze(0)) @ vectors.t()
        self.rho, self.inverse = rho, inverse.float()
        return self.inverse


MaskRule = Callable[[int, torch.Tensor], torch.Tensor]
"""(iteration, W + U [out, in]) -> mask (True = kept) for this iteration's projection."""

RhoRule = Callable[[float, int], float]
"""(ρ, mask positions changed since the last check) -> ρ for the next iterations."""


def constant_rho(rho: float, changes: int) -> float:
    return rho


def support_adaptive_rho(kept: int) -> RhoRule:
    """ALPS's schedule: at each check multiply ρ by 1.3, 1.2 or 1.1 as the share of the
    `kept` support positions that changed is above 10%, above 0.5%, or below (stabilising)."""

    def rule(rho: float, changes: int) -> float:
        share = changes / max(kept, 1)
        factor = 1.3 if share > 0.1 else 1.2 if share > 0.005 else 1.1
        return min(rho * factor, 1e6)

    return rule


@dataclass
class AdmmResult:
    weight: torch.Tensor  # Z of the last iteration: zero outside `mask`, normalised [out, in]
    mask: torch.Tensor  # bool [out, in]
    iterations: int
    rho: float


def run_admm(
    problem: LayerProblem,
    mask_rule: MaskRule,
    iterations: int,
    rho: float,
    rho_rule: RhoRule = constant_rho,
    check_every: int = 3,
    stop_after: int = 0,
    stable_changes: int = 0,
) -> AdmmResult:
    """Up to `iterations` ADMM steps from W = W₀, U = 0; the result is Π_mask(W + U).

    The mask's changes are counted every `check_every` iterations and passed to `rho_rule`.
    With `stop_after` > 0, the run stops at a check that finds at most `stable_changes`
    changed positions once at least `stop_after` iterations are done.
    """
    inverse = PenalisedInverse(problem.hessian)
    w = problem.dense.clone()
    u = torch.zeros_like(w)
    checked = mask = mask_rule(0, w)
    for it in range(iterations):
        mask = mask_rule(it, w + u)
        z = (w + u) * mask
        if (it + 1) % check_every == 0:
            changes = int((mask != checked).sum())
            checked = mask
            if stop_after and it + 1 >= stop_after and changes <= stable_changes:
                return AdmmResult(z, mask, it + 1, rho)
            new_rho = rho_rule(rho, changes)
        else:
            new_rho = rho
        u += w - z
        if new_rho != rho:
            u *= rho / new_rho  # the scaled dual U is V / ρ
            rho = new_rho
        w = (problem.target + rho * (z - u)) @ inverse(rho)
    return AdmmResult((w + u) * mask, mask, iterations, rho)


def pcg_on_support(
    problem: LayerProblem,
    mask: torch.Tensor,
    start: torch.Tensor,
    iterations: int,
    tolerance: float = 1e-4,
) -> tuple[torch.Tensor, int]:
    """Least squares restricted to `mask` by preconditioned conjugate gradients, row-wise.

    Solves H_SS w_S = (W₀H)_S for every row (S its kept columns) starting from `start`
    [out, in], with the Jacobi preconditioner diag(H)⁻¹. Returns (weights, iterations).
    """
    h = problem.hessian
    keep = mask.to(h.dtype)
    precond = 1.0 / torch.diagonal(h).unsqueeze(0)
    w = start * keep
    r = (problem.target - w @ h) * keep
    limit = tolerance * (problem.target * keep).norm(dim=1)
    z = r * precond
    p = z
    rz = (r * z).sum(1)
    done = 0
    while done < iterations:
        done += 1
        hp = (p @ h) * keep
        alpha = rz / (p * hp).sum(1).clamp_min(1e-30)
        w = w + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * hp
        if bool((r.norm(dim=1) <= limit).all()):
            break
        z = r * precond
        rz_next = (r * z).sum(1)
        p = z + (rz_next / rz.clamp_min(1e-30)).unsqueeze(1) * p
        rz = rz_next
    return w * keep, done
