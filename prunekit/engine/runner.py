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

from prunekit.engine.capture import CapturedInputs, capture_inputs
from prunekit.engine.collectors import COLLECTORS, Collector
from prunekit.errors import choice_error
from prunekit.models.adapter import ModelAdapter, weight_matrix

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
    """Hook each module so its inputs feed the named collectors while the context is open."""
    collectors: dict[str, dict[str, Collector]] = {}
    handles = []

    def hook(per_layer: dict[str, Collector]):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            for c in per_layer.values():
                c.update(x)

        return fn

    for path, module in modules.items():
        in_features = weight_matrix(module).shape[1]
        per_layer = {n: COLLECTORS[n](in_features, torch.device(device)) for n in names}
        collectors[path] = per_layer
        handles.append(module.register_forward_hook(hook(per_layer)))
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
        self.collect = tuple(collect)
        self.captured: CapturedInputs = capture_inputs(adapter, windows, batch_size)
        self.hidden = self.captured.hidden

    @torch.no_grad()
    def run_block(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        """Block `index` applied to `inputs` [n, L, H], batch by batch."""
        block = self.adapter.blocks[index]
        outputs = torch.empty_like(inputs)
        for start in range(0, inputs.shape[0], self.batch_size):
            h = inputs[start : start + self.batch_size].to(self.device)
            call = self.captured.call(h.shape[0], index).to(self.device)
            out = block(h, *call.args, **call.kwargs)
            out = out[0] if isinstance(out, tuple) else out
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
