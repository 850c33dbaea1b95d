"""Structures masked by forward hooks instead of cut out: a KV group or MLP channel
scaled to zero at the input of o / down computes exactly what the cut model computes,
so a search or a training loop can try masks without surgery (Bonsai, learned masks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def input_scale_hook(scale: Callable[[], torch.Tensor], repeat: int = 1) -> Callable:
    """A forward pre-hook multiplying a linear's input [..., in] by `scale()` [in / repeat],
    each entry repeated `repeat` times (head_dim · query heads per KV group for o)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        gate = scale().repeat_interleave(repeat).to(device=x.device, dtype=x.dtype)
        return (x * gate, *args[1:])

    return hook


@contextmanager
def removed_after(handles: list[RemovableHandle]) -> Iterator[None]:
    """Keep `handles` registered for the `with` body, then remove them."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
