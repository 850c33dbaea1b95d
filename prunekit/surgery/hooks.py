"""Structures masked by forward hooks instead of cut out: a KV group or MLP channel
scaled to zero at the input of o / down computes exactly what the cut model computes,
so a search or a training loop can try masks without surgery (Bonsai, learned masks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prunekit.models.adapter import ModelAdapter
from prunekit.surgery.rotate import check_rotatable


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


class StructureScales:
    """Scales of a model's structures applied by hooks, `values` per kind a list:
    - "kv": per block [kv_heads], scaling o's input columns of each KV group;
    - "intermediate": per block [intermediate], scaling down's input columns;
    - "layers": per block a scalar z, the block giving x + z·(block(x) − x);
    - "hidden": one [hidden] tensor, as LLM-Shearing's `hidden_z`: it scales the embedding
      output and every o / down output, and each RMS norm averages over the coordinates
      whose scale is nonzero and multiplies its output by the scales.
    At 0/1 values the model computes what the cut model computes (learned masks train
    the values; the NAS super-network sets them to a sub-network)."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.values: dict[str, list[torch.Tensor]] = {}

    @contextmanager
    def attached(self, hidden: bool = False) -> Iterator[StructureScales]:
        """Hooks applying the current `values` while the context is open (hidden scales
        only with `hidden`, on RMS pre-norm models)."""
        adapter, handles = self.adapter, []
        if hidden:
            check_rotatable(adapter)

        def scale(kind: str, index: int, repeat: int) -> Callable:
            return input_scale_hook(lambda: self.values[kind][index], repeat)

        def skip(index: int):
            def fn(module: nn.Module, args: tuple, kwargs: dict, output):
                x = args[0] if args else kwargs["hidden_states"]
                z = self.values["layers"][index].to(x.dtype)
                out = output[0] if isinstance(output, tuple) else output
                mixed = x + z * (out - x)
                return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

            return fn

        def gate_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * self.values["hidden"][0].to(output.dtype)

        def renormalise(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            """RMS over the open coordinates: rescale by rms_all / rms_open, then gate."""
            z = self.values["hidden"][0]
            square = args[0].float().pow(2)
            open_ = (z != 0).float()
            eps = adapter.norm_eps(module)
            every = square.mean(-1, keepdim=True)
            kept = (square * open_).sum(-1, keepdim=True) / open_.sum().clamp(min=1)
            ratio = torch.rsqrt(kept + eps) / torch.rsqrt(every + eps)
            return (output.float() * ratio * z).to(output.dtype)

        for i, block in enumerate(adapter.blocks):
            o, down = adapter.linear(block, "o"), adapter.linear(block, "down")
            handles.append(o.register_forward_pre_hook(scale("kv", i, adapter.group_width)))
            handles.append(down.register_forward_pre_hook(scale("intermediate", i, 1)))
            handles.append(block.register_forward_hook(skip(i), with_kwargs=True))
            if hidden:
                handles += [m.register_forward_hook(gate_output) for m in (o, down)]
                handles += [
                    adapter.norm(block, r).register_forward_hook(renormalise)
                    for r in adapter.spec.norms
                ]
        if hidden:
            handles.append(adapter.embed.register_forward_hook(gate_output))
            handles.append(adapter.final_norm.register_forward_hook(renormalise))
        with removed_after(handles):
            yield self
