"""SparseLLM / AdaGP (Bai et al., NeurIPS 2024, "Towards global pruning of pre-trained
language models", first titled "Gradient-free adaptive global pruning").

The block's loss is split over its gated MLP y = W_d (σ(W_g x) ⊙ W_u x) with auxiliary
variables for the up output z, the gate output s and the down input p, coupled by
quadratic penalties (α on z = W_u X and s = W_g X, β on Y = W_d p, γ on p = σ(s) ⊙ z),
so each linear is pruned against targets that already account for the others. Per
block, as BaiTheBest/SparseLLM's `llama_sparsellm` does:

1. One pass over the dense block gives X (MLP input), Y (MLP output) and the dense
   z, s, p for every calibration token; the attention linears are pruned by SparseGPT.
2. For `epochs` rounds (1 for blocks listed in `single_epoch_blocks`):
   - from the second round on, W_u = z X⁺, W_g = s X⁺, W_d = Y p⁺ (least squares) and
     the Hessian of W_d is rebuilt from p;
   - W_u, W_g, W_d are pruned by SparseGPT (the Hessians of W_u and W_g keep the
     damping added by every earlier round, as the reference's in-place update does);
   - p = (β W_dᵀ W_d + γ I)⁻¹ (β W_dᵀ Y + γ σ(s) ⊙ z);
   - z = (α W_u X + γ σ(s) ⊙ p) / (α + γ σ(s)²);
   - s takes `s_steps` passes of gradient descent (step `s_lr`, `s_batch` tokens per
     step) on α‖s − W_g X‖² + γ‖p − σ(s) ⊙ z‖².
3. The block's outputs, with every pruned linear, feed the next block.

Defaults are the reference's (α = β = γ = 5, 4 rounds, 1 round on blocks 1, 30 and 31 as
its LLaMA-2 loop hard-codes, SparseGPT blocksize 128 and damping 0.01). The reference keeps
X, Y, z, s, p in float16; prunekit keeps them in float32. The block's MLP reconstruction
error ‖Y − MLP(X)‖² / ‖Y‖² after each round is recorded. `keep_best=true` (prunekit's
option) keeps the weights of the round with the lowest such error: on SmolLM2-135M the
reference's rounds raise the error in most blocks and diverge in one (docs/global.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunekit.engine.runner import BlockContext, LayerStats
from prunekit.errors import PrunekitError
from prunekit.methods.base import register
from prunekit.methods.unstructured.sparsegpt import SparseGPT, SparseGPTConfig, sparsegpt_prune
from prunekit.models.adapter import get_path, set_weight_matrix, weight_matrix
from prunekit.surgery.hooks import removed_after
from prunekit.surgery.masks import Target

if TYPE_CHECKING:
    from prunekit.methods.unstructured.updates.base import WeightUpdate

MLP = ("gate", "up", "down")


@dataclass
class SparseLLMConfig(SparseGPTConfig):
    epochs: int = 4  # rounds of pruning and auxiliary updates per block
    single_epoch_blocks: str = "1,30,31"  # block indices given one round (the reference's)
    alpha: float = 5.0  # penalty on z = W_u X and s = W_g X
    beta: float = 5.0  # penalty on Y = W_d p
    gamma: float = 5.0  # penalty on p = σ(s) ⊙ z
    s_steps: int = 2  # gradient passes over the tokens for s
    s_lr: float = 0.01
    s_batch: int = 1000  # tokens per gradient step on s
    keep_best: bool = False  # prunekit's: keep the round with the lowest MLP error

    ranges = {
        **SparseGPTConfig.ranges,
        "epochs": ">= 1",
        "alpha": "> 0",
        "beta": "> 0",
        "gamma": "> 0",
        "s_steps": ">= 0",
        "s_lr": ">= 0",
        "s_batch": ">= 1",
    }
    single: set[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.single = {int(i) for i in self.single_epoch_blocks.split(",") if i.strip()}
        except ValueError:
            raise PrunekitError(
                f"single_epoch_blocks must be comma-separated block indices, "
                f"got {self.single_epoch_blocks!r}"
            ) from None


@dataclass
class Auxiliary:
    """Calibration tokens as columns: X [d, N], Y [d, N], z, s, p [f, N] (float32)."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor
    p: torch.Tensor


def capture_mlp(ctx: BlockContext, modules: dict[str, nn.Module]) -> Auxiliary:
    """One pass of the block recording its MLP's input, output and inner activations."""
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "y", "z", "s", "p")}

    def hook(into_in: str | None, into_out: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if into_in:
                seen[into_in].append(args[0].detach().flatten(0, -2).float().cpu())
            seen[into_out].append(output.detach().flatten(0, -2).float().cpu())

        return fn

    handles = [
        modules["up"].register_forward_hook(hook("x", "z")),
        modules["gate"].register_forward_hook(hook(None, "s")),
        modules["down"].register_forward_hook(hook("p", "y")),
    ]
    with removed_after(handles):
        ctx.runner.sweep_block(ctx.index, ctx.inputs)
    return Auxiliary(**{k: torch.cat(v).T.contiguous() for k, v in seen.items()})


def hessian_of(columns: torch.Tensor) -> torch.Tensor:
    """(2 / N) · P Pᵀ for tokens as columns [f, N] (SparseGPT's H)."""
    return 2.0 / columns.shape[1] * columns @ columns.T


def add_damping(hessian: torch.Tensor, percdamp: float) -> None:
    """The damping SparseGPT adds, left in place (the reference mutates its H)."""
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    hessian.diagonal().add_(percdamp * hessian.diagonal().mean())


def mlp_error(modules: dict[str, nn.Module], act, aux: Auxiliary) -> float:
    """‖Y − W_d(σ(W_g X) ⊙ W_u X)‖² / ‖Y‖² with the current weights."""
    w = {k: weight_matrix(m).float() for k, m in modules.items()}
    out = w["down"] @ (act(w["gate"] @ aux.x) * (w["up"] @ aux.x))
    return float((out - aux.y).square().sum() / aux.y.square().sum())


@register
class SparseLLM(SparseGPT):
    """SparseGPT's `prune_linear` for attention; `prune_block` couples the MLP."""

    name = "sparsellm"
    summary = "AdaGP: SparseGPT inside a block's MLP coupled by auxiliary variables (global view)"
    Config = SparseLLMConfig
    distributes = False  # the auxiliary variables hold every calibration token on one rank

    def __init__(self, config: SparseLLMConfig | None = None, update: WeightUpdate | None = None):
        super().__init__(config, update)
        self.errors: list[list[float]] = []

    def details(self) -> dict:
        return {"sparsellm": {"mlp_relative_error": self.errors}}

    def prune_block(self, ctx: BlockContext, stats: dict[str, LayerStats], target: Target) -> None:
        adapter, config = ctx.adapter, self.config
        if not all(role in adapter.spec.linears for role in MLP):
            raise PrunekitError("sparsellm needs a gated MLP (gate, up and down projections)")
        modules = {role: adapter.linear(ctx.block, role) for role in MLP}
        parent = adapter.spec.linears["gate"].rpartition(".")[0]
        act = getattr(get_path(ctx.block, parent), "act_fn", None)
        if act is None:
            raise PrunekitError(f"sparsellm: no activation `act_fn` on {parent!r}")
        aux = capture_mlp(ctx, modules)
        paths = {role: adapter.spec.linears[role] for role in MLP}
        for path, module in ctx.linears().items():
            if path not in paths.values():
                self.prune_linear(module, stats[path], target, path)
        device = weight_matrix(modules["up"]).device
        aux = Auxiliary(*(t.to(device) for t in vars(aux).values()))
        hessians = {role: stats[paths[role]]["hessian"].float().clone() for role in MLP}
        x_pinv = torch.linalg.pinv(aux.x) if config.epochs > 1 else None
        rounds = 1 if ctx.index in config.single else config.epochs
        errors, best = [], None
        for step in range(rounds):
            if step > 0:
                set_weight_matrix(modules["up"], aux.z @ x_pinv)
                set_weight_matrix(modules["gate"], aux.s @ x_pinv)
                set_weight_matrix(modules["down"], aux.y @ torch.linalg.pinv(aux.p))
                hessians["down"] = hessian_of(aux.p)
            for role in MLP:
                new, _ = sparsegpt_prune(
                    weight_matrix(modules[role]), hessians[role], target, config.blocksize,
                    config.percdamp,
                )  # fmt: skip
                set_weight_matrix(modules[role], new)
                add_damping(hessians[role], config.percdamp)
            errors.append(mlp_error(modules, act, aux))
            if config.keep_best and errors[-1] == min(errors):
                best = {role: weight_matrix(m).clone() for role, m in modules.items()}
            if step + 1 < rounds:
                self._update_auxiliary(modules, act, aux)
        if best is not None:
            for role, weight in best.items():
                set_weight_matrix(modules[role], weight)
        self.errors.append(errors)

    @torch.no_grad()
    def _update_auxiliary(self, modules: dict[str, nn.Module], act, aux: Auxiliary) -> None:
        """The closed-form p and z updates and the gradient steps on s."""
        config = self.config
        alpha, beta, gamma = config.alpha, config.beta, config.gamma
        w_down = weight_matrix(modules["down"]).float()
        eye = torch.eye(w_down.shape[1], dtype=w_down.dtype, device=w_down.device)
        system = beta * w_down.T @ w_down + gamma * eye
        aux.p = torch.linalg.solve(system, beta * w_down.T @ aux.y + gamma * act(aux.s) * aux.z)
        swish = act(aux.s)
        w_up = weight_matrix(modules["up"]).float()
        aux.z = (alpha * (w_up @ aux.x) + gamma * swish * aux.p) / (alpha + gamma * swish**2)
        w_gate = weight_matrix(modules["gate"]).float()
        for _ in range(config.s_steps):
            for start in range(0, aux.s.shape[1], config.s_batch):
                cols = slice(start, start + config.s_batch)
                s = aux.s[:, cols].clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = alpha * (s - w_gate @ aux.x[:, cols]).square().sum()
                    loss = loss + gamma * (aux.p[:, cols] - act(s) * aux.z[:, cols]).square().sum()
                    (grad,) = torch.autograd.grad(loss, s)
                aux.s[:, cols] = s.detach() - config.s_lr * grad
