"""Capture what the decoder blocks receive: block 0's hidden states and every block's
extra arguments (attention mask, rotary embeddings, ...), without running any block.

Every block's forward is swapped for the identity while the model runs, and the run
stops before the final norm and head, so capturing costs one embedding lookup per window.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunekit.engine.activations import activation_buffer
from prunekit.models.adapter import ModelAdapter


class _StopForward(Exception):
    """Raised after the last block's inputs are seen, to skip the model's head."""


@dataclass
class BlockCall:
    """The arguments a block gets besides its hidden states: `block(h, *args, **kwargs)`."""

    args: tuple
    kwargs: dict

    def to(self, device: torch.device | str) -> BlockCall:
        def move(x: object) -> object:
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, tuple | list):
                return type(x)(move(v) for v in x)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return BlockCall(move(self.args), move(self.kwargs))


@dataclass
class CapturedInputs:
    """Block 0's hidden states [n, L, H] and, per batch size, each block's BlockCall."""

    hidden: torch.Tensor
    calls: dict[int, list[BlockCall]] = field(default_factory=dict)

    def call(self, batch_size: int, block_index: int) -> BlockCall:
        return self.calls[batch_size][block_index]


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _strip_cache(kwargs: dict) -> dict:
    drop = ("past_key_values", "past_key_value", "layer_past", "cache")
    out = {k: v for k, v in kwargs.items() if k not in drop}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture_inputs(
    adapter: ModelAdapter, windows: torch.Tensor, batch_size: int, spill: Path | None = None
) -> CapturedInputs:
    """Run the model's embedding stage over `windows` [n, L] and capture block inputs.

    Hidden states are kept on the CPU (in a file-backed buffer in `spill` when given,
    `engine/activations.py`); calls are kept on the model's device.
    """
    model, blocks = adapter.model, adapter.blocks
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []  # one buffer [n, L, H], filled batch by batch
    filled = [0]
    calls: dict[int, list[BlockCall]] = {}
    recording: list[BlockCall] | None = None
    handles = []

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h, rest, kw = _split_hidden(args, kwargs)
            if index == 0:
                if not hidden:
                    shape = (windows.shape[0], *h.shape[1:])
                    hidden.append(activation_buffer(shape, h.dtype, spill))
                hidden[0][filled[0] : filled[0] + h.shape[0]] = h.detach()
                filled[0] += h.shape[0]
            if recording is not None:
                recording.append(BlockCall(rest, _strip_cache(kw)))
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            block.forward = lambda *a, **k: a[0] if a else k["hidden_states"]  # identity
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            recording = [] if batch.shape[0] not in calls else None
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
            if recording is not None:
                calls[batch.shape[0]] = recording
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            block.__dict__.pop("forward", None)
    return CapturedInputs(hidden[0], calls)
