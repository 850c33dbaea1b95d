"""Gradients of the language-model loss, one block at a time (bounded memory).

A forward pass through the sequential engine stores every block's input hidden states
(activation checkpoints at block boundaries: [n, L, H] per block on the store device).
The loss gradient with respect to the last hidden states comes from the final norm and
the LM head; then, from the last block to the first, the block is re-run with autograd
on, `backward` with the incoming gradient fills its parameters' `.grad` and gives the
gradient for the block below. Only one block's graph and gradients exist at a time, and
the result equals full backpropagation of the mean token cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.engine.runner import SequentialRunner
from prunekit.models.adapter import ModelAdapter
from prunekit.progress import progress as tqdm


def _head_gradient(
    adapter: ModelAdapter, final: torch.Tensor, windows: torch.Tensor, runner: SequentialRunner
) -> tuple[torch.Tensor, float]:
    """d(mean token NLL)/d(last hidden states) [n, L, H] and the loss (nats/token)."""
    device, batch_size = runner.device, runner.batch_size
    norm, head = adapter.final_norm, adapter.lm_head
    homes = [next(m.parameters()).device for m in (norm, head)]
    norm.to(device)
    head.to(device)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    grad = torch.empty_like(final)
    total = 0.0
    for start in range(0, final.shape[0], batch_size):
        h = final[start : start + batch_size].to(device).requires_grad_(True)
        targets = windows[start : start + batch_size, 1:].to(device)
        with torch.enable_grad():
            logits = head(norm(h))[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            (g,) = torch.autograd.grad(loss / tokens, h)
        grad[start : start + h.shape[0]] = g.to(grad.device)
        total += loss.item()
    norm.to(homes[0])
    head.to(homes[1])
    return grad, total / tokens


def blockwise_lm_gradients(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    on_block: Callable[[int, nn.Module], None],
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> float:
    """Backpropagate the LM loss over `windows` [n, L] block by block, last to first.

    `on_block(index, block)` is called while the block's parameters hold their loss
    gradients (`.grad`, summed over all windows); they are cleared afterwards. The
    model is not changed. Returns the loss (mean token NLL, nats).
    """
    runner = SequentialRunner(adapter, windows, device, batch_size, progress="forward")
    inputs = []
    for ctx in runner:
        inputs.append(ctx.inputs)
    grad, loss = _head_gradient(adapter, runner.hidden, windows, runner)
    blocks = adapter.blocks
    for index in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="backward"):
        block = blocks[index]
        home = next(block.parameters()).device
        block.to(device)
        params = list(block.parameters())
        trainable = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        grad_in = torch.empty_like(grad)
        for start in range(0, grad.shape[0], batch_size):
            h = inputs[index][start : start + batch_size].to(device).requires_grad_(True)
            call = runner.captured.call(h.shape[0], index).to(device)
            with torch.enable_grad():
                out = block(h, *call.args, **call.kwargs)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(grad[start : start + h.shape[0]].to(device))
            grad_in[start : start + h.shape[0]] = h.grad.to(grad_in.device)
        on_block(index, block)
        for p, flag in zip(params, trainable, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        block.to(home)
        inputs[index] = None
        grad = grad_in
    return loss
