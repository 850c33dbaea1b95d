"""The sequential engine: calibrate one block, change it, move on (llm-compressor style).

Only the current block sits on the compute device. Activations kept between blocks are
[nsamples, seqlen, hidden] (calibration windows only, never the model's max context).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.engine.capture import BlockCall, CapturedInputs, capture_inputs
from prunekit.engine.collectors import COLLECTORS, Collector
from prunekit.errors import choice_error
from prunekit.models.adapter import ModelAdapter

LayerStats = dict[str, torch.Tensor]  # collector name -> statistic
PROPAGATION = ("pruned", "dense")


class BlockContext:
    """One block during the sequential pass: the module on the device and its inputs."""

    def __init__(self, runner: SequentialRunner, index: int):
        self.runner = runner
        self.index = index
        self.adapter = runner.adapter
        self.block: nn.Module = runner.adapter.blocks[index]
        self.inputs: torch.Tensor = runner.hidden  # [n, L, H] on the store device
        self.stats: dict[str, LayerStats] = {}  # what the runner's `collect` gathered

    def linears(self) -> dict[str, nn.Module]:
        return self.adapter.linears(self.block)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Run the block over all windows: [n, L, H] -> [n, L, H] (on the store device)."""
        inputs = self.inputs if inputs is None else inputs
        return self.runner.run_block(self.index, inputs)

    def apply(
        self, hidden: torch.Tensor, weights: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The block on a batch of windows `hidden` [b, L, H], on the device, with autograd.

        `weights` replaces parameters by name for this call only, e.g.
        `{"mlp.down_proj.weight": masked}` (training masks without touching the block).
        """
        return self.runner.call_block(self.index, hidden.to(self.runner.device), weights)

    @torch.no_grad()
    def collect(
        self, names: Iterable[str], modules: dict[str, nn.Module] | None = None
    ) -> dict[str, LayerStats]:
        """One forward pass over the block gathering the named statistics on each linear.

        Returns `{linear path: {statistic name: tensor}}`.
        """
        names = list(names)
        for name in names:
            if name not in COLLECTORS:
                raise choice_error("statistic", name, COLLECTORS)
        modules = self.linears() if modules is None else modules
        with attach_collectors(modules, names, self.runner.device) as collectors:
            self.forward()
        return {
            path: {name: c.result() for name, c in per_layer.items()}
            for path, per_layer in collectors.items()
        }


@contextmanager
def attach_collectors(
    modules: dict[str, nn.Module], names: list[str], device: torch.device | str
) -> Iterator[dict[str, dict[str, Collector]]]:
    """Hook each module so its inputs feed the named collectors while the context is open.

    Any module works (linears, norms, ...): collectors are sized by the first input seen,
    so a module that never runs has no entry.
    """
    collectors: dict[str, dict[str, Collector]] = {}
    handles = []

    def hook(path: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if path not in collectors:
                width = x.shape[1]
                collectors[path] = {n: COLLECTORS[n](width, torch.device(device)) for n in names}
            for c in collectors[path].values():
                c.update(x)

        return fn

    for path, module in modules.items():
        handles.append(module.register_forward_hook(hook(path)))
    try:
        yield collectors
    finally:
        for h in handles:
            h.remove()


class SequentialRunner:
    """Iterate over the blocks of a model with calibration activations flowing through.

    ```
    runner = SequentialRunner(adapter, windows, device="cpu")
    for ctx in runner:          # ctx.block is on the device
        stats = ctx.collect(["input_norm"])
        ...                     # change ctx.block in place
    ```
    After each step the (changed) block's outputs become the next block's inputs, unless
    `propagate="dense"`, where the inputs come from the unchanged block. Statistics named
    in `collect` are gathered before the loop body sees the block (`ctx.stats`); with
    dense propagation that happens in the same pass that computes the block's outputs, so
    each block runs once.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        windows: torch.Tensor,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        propagate: str = "pruned",
        progress: str | None = "blocks",
        collect: tuple[str, ...] = (),
    ):
        if propagate not in PROPAGATION:
            raise choice_error("propagation", propagate, PROPAGATION)
        self.adapter = adapter
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.propagate = propagate
        self.progress = progress
        self.windows = windows
        self.collect = tuple(collect)
        self.captured: CapturedInputs = capture_inputs(adapter, windows, batch_size)
        self.hidden = self.captured.hidden

    def block_call(self, batch_size: int, index: int) -> BlockCall:
        """Block `index`'s extra arguments for a batch of `batch_size` windows (captured on
        first use for a size the engine does not run, e.g. a training micro-batch)."""
        if batch_size not in self.captured.calls:
            extra = capture_inputs(self.adapter, self.windows[:batch_size], batch_size)
            self.captured.calls[batch_size] = extra.calls[batch_size]
        return self.captured.call(batch_size, index).to(self.device)

    def call_block(
        self, index: int, hidden: torch.Tensor, weights: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Block `index` on one batch `hidden` [b, L, H] already on the device; `weights`
        optionally replaces some of its parameters by name for this call."""
        block = self.adapter.blocks[index]
        call = self.block_call(hidden.shape[0], index)
        args = (hidden, *call.args)
        if weights:
            out = torch.func.functional_call(block, weights, args, call.kwargs)
        else:
            out = block(*args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_block(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        """Block `index` applied to `inputs` [n, L, H], batch by batch: [n, L, H'].

        H' may differ from H when a method changes the block's width (SliceGPT).
        """
        outputs: torch.Tensor | None = None
        for start in range(0, inputs.shape[0], self.batch_size):
            h = inputs[start : start + self.batch_size].to(self.device)
            out = self.call_block(index, h)
            if outputs is None:
                shape = (inputs.shape[0], *out.shape[1:])
                outputs = torch.empty(shape, dtype=out.dtype, device=inputs.device)
            outputs[start : start + h.shape[0]] = out.to(outputs.device)
        return outputs

    def __iter__(self) -> Iterator[BlockContext]:
        blocks = self.adapter.blocks
        indices = range(len(blocks))
        if self.progress:
            indices = tqdm(indices, desc=self.progress, unit="block", leave=False)
        for index in indices:
            block = blocks[index]
            home = next(block.parameters()).device
            block.to(self.device)
            ctx = BlockContext(self, index)
            dense_out = None
            if self.collect or self.propagate == "dense":
                with attach_collectors(ctx.linears(), list(self.collect), self.device) as found:
                    dense_out = ctx.forward()
                ctx.stats = {
                    path: {name: c.result() for name, c in per_layer.items()}
                    for path, per_layer in found.items()
                }
            if self.propagate != "dense":
                dense_out = None
            yield ctx
            self.hidden = dense_out if dense_out is not None else ctx.forward()
            block.to(home)
