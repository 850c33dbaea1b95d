"""Kronecker-factored curvature (K-FAC) of every prunable linear, from one backward pass.

For a linear y = W x the empirical Fisher of the language-model loss is approximated by
F ≈ G ⊗ A with A = E[x xᵀ] over input tokens [in, in] and G = E[g gᵀ] over the loss
gradients g = ∂L/∂y [out, out]. As in LLM Surgeon's `use_iad` estimate, L is each
window's mean next-token NLL with the true next tokens, and both expectations average over
every position of every window (n · L tokens). The backward pass is the engine's
block-by-block one (`blockwise_lm_gradients`), so only one block's graph exists at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunekit.engine.gradients import blockwise_lm_gradients
from prunekit.models.adapter import ModelAdapter


class _Factors:
    """Running sums of x xᵀ and g gᵀ for one linear (float32)."""

    def __init__(self, grad_scale: float):
        self.grad_scale = grad_scale
        self.a: torch.Tensor | None = None
        self.g: torch.Tensor | None = None

    def forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # the engine's no-grad forward pass: factors come from the backward re-run
        x = inputs[0].detach().flatten(0, -2).float()
        xx = x.T @ x
        self.a = xx if self.a is None else self.a + xx
        output.register_hook(self.gradient_hook)

    def gradient_hook(self, grad: torch.Tensor) -> None:
        g = grad.detach().flatten(0, -2).float() * self.grad_scale
        gg = g.T @ g
        self.g = gg if self.g is None else self.g + gg


def kfac_factors(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    on_block: Callable[[int, dict[str, tuple[torch.Tensor, torch.Tensor]]], None],
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> float:
    """K-FAC factors of every linear of every block for calibration `windows` [n, L].

    `on_block(index, {path: (A [in, in], G [out, out])})` is called once per block, last
    block first, with float32 factors on `device`; nothing is kept afterwards. Returns the
    mean token NLL (nats).
    """
    n, length = windows.shape
    tokens = n * length
    # the engine's loss is the mean over all windows; each window's own mean is n times that
    hooks, sums = [], {}
    for index, block in enumerate(adapter.blocks):
        for path, module in adapter.linears(block).items():
            factors = sums[(index, path)] = _Factors(grad_scale=float(n))
            hooks.append(module.register_forward_hook(factors.forward_hook))

    def collect(index: int, block: nn.Module) -> None:
        out = {}
        for path in adapter.linears(block):
            factors = sums.pop((index, path))
            out[path] = (factors.a / tokens, factors.g / tokens)
        on_block(index, out)

    try:
        return blockwise_lm_gradients(adapter, windows, collect, device, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
