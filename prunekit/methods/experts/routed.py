"""The tokens a mixture-of-experts router sends to each expert, as the expert sees them."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def routed_inputs(
    experts: nn.Module, args: tuple
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """From the arguments of an experts module's forward (`x` [tokens, H], `index`
    [tokens, top_k], ...): per expert reached, `(e, inputs [t, H], hidden [t, I])` with
    the float32 inputs of its fused gate/up weight and of its down weight
    (act(gate) · up)."""
    x, index = args[0], args[1]
    for e in index.unique().tolist():
        tokens, _ = torch.where(index == e)
        inputs = x[tokens].float()
        gate, up = F.linear(inputs, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
        yield e, inputs, experts.act_fn(gate) * up
