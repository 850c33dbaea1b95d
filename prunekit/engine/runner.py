"""The sequential engine: calibrate one block, change it, move on (llm-compressor style).

Only the current block sits on the compute device. Activations kept between blocks are
[nsamples, seqlen, hidden] (calibration windows only, never the model's max context).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from prunekit.engine.activations import activation_buffer
from prunekit.engine.capture import BlockCall, CapturedInputs, capture_inputs
from prunekit.engine.collectors import COLLECTORS, Collector
from prunekit.engine.distributed import world
from prunekit.errors import choice_error
from prunekit.models.adapter import ModelAdapter
from prunekit.progress import progress as tqdm

LayerStats = dict[str, torch.Tensor]  # collector name -> statistic
PROPAGATION = ("pruned", "dense")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16")


def compute_precision(device: torch.device, compute_dtype: str):
    """The context block forwards run in: the weights' own dtype ("auto"), or autocast to
    bfloat16 / float16 (matmuls in that dtype; the residual stream, the statistics and
    every solve stay float32)."""
    if compute_dtype == "auto":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, compute_dtype))


class BlockContext:
    """One block during the sequential pass: the module on the device and its inputs."""

    def __init__(self, runner: SequentialRunner, index: int):
        self.runner = runner
        self.index = index
        self.adapter = runner.adapter
        self.block: nn.Module = runner.adapter.blocks[index]
        self.inputs: torch.Tensor = runner.hidden  # [n, L, H] on the store device
        self.stats: dict[str, LayerStats] = {}  # what the runner's `collect` gathered

    def release(self) -> None:
        """Drop the references to this block's activations and statistics (the runner
        calls it once the block is done, so a caller's `ctx` holds no stale buffers)."""
        self.inputs = torch.empty(0)
        self.stats = {}

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
            self.runner.sweep_block(self.index, self.inputs)
        return collected_stats(collectors)


@contextmanager
def attach_collectors(
    modules: dict[str, nn.Module], names: list[str], device: torch.device | str
) -> Iterator[dict[str, dict[str, Collector]]]:
    """Hook each module so its inputs feed the named collectors while the context is open.

    Any module works (linears, norms, ...): collectors are sized by the first input seen,
    so a module that never runs has no entry. Modules called one after the other on the
    same input tensor (q/k/v, gate/up) share one set of collectors, updated once.
    """
    collectors: dict[str, dict[str, Collector]] = {}
    shared: set[str] = set()
    last: list = [None, None]  # the previous hook's (input tensor, path)
    handles = []

    def hook(path: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if path in shared:
                return
            x = args[0].detach()
            if path not in collectors:
                if last[0] is not None and _same(x, last[0]):
                    collectors[path] = collectors[last[1]]
                    shared.add(path)
                    return
                width = x.shape[-1]
                collectors[path] = {n: COLLECTORS[n](width, torch.device(device)) for n in names}
            last[:] = [x, path]
            flat = x.reshape(-1, x.shape[-1])
            for c in collectors[path].values():
                c.update(flat)

        return fn

    for path, module in modules.items():
        handles.append(module.register_forward_hook(hook(path)))
    try:
        yield collectors
    finally:
        for h in handles:
            h.remove()


def collected_stats(collectors: dict[str, dict[str, Collector]]) -> dict[str, LayerStats]:
    """`{path: {statistic name: tensor}}` from what `attach_collectors` gathered, merged
    over the ranks of a process group first (each shared set once, in hook order)."""
    if world()[1] > 1:
        merged: set[int] = set()
        for per_layer in collectors.values():
            if id(per_layer) not in merged:
                merged.add(id(per_layer))
                for name in sorted(per_layer):
                    per_layer[name].merge_ranks()
    return {
        path: {name: c.result() for name, c in per_layer.items()}
        for path, per_layer in collectors.items()
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same view of the same, unmodified memory."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a._version == b._version
    )


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
    each block runs once. `overwrite_inputs=True` lets a block's outputs overwrite its
    inputs (one activation buffer instead of two) for callers that keep no `ctx.inputs`.
    `compute_dtype` ("auto", "bfloat16", "float16") is the precision of block forwards
    (`compute_precision`). When the adapter streams blocks from disk (`adapter.offload`),
    each block is read before its step and freed after it; `writes=True` (the pass that
    changes the blocks) first writes it, changed, to the offload's staging folder.
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
        overwrite_inputs: bool = False,
        compute_dtype: str = "auto",
        writes: bool = False,
    ):
        if propagate not in PROPAGATION:
            raise choice_error("propagation", propagate, PROPAGATION)
        if compute_dtype not in COMPUTE_DTYPES:
            raise choice_error("compute dtype", compute_dtype, COMPUTE_DTYPES)
        self.compute_dtype = compute_dtype
        self.writes = writes
        self.adapter = adapter
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.propagate = propagate
        self.progress = progress
        self.windows = windows
        self.collect = tuple(collect)
        self.overwrite_inputs = overwrite_inputs
        offload = adapter.offload
        self.spill = offload.activations if offload is not None else None
        self.captured: CapturedInputs = capture_inputs(adapter, windows, batch_size, self.spill)
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
        with compute_precision(self.device, self.compute_dtype):
            if weights:
                out = torch.func.functional_call(block, weights, args, call.kwargs)
            else:
                out = block(*args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_block(
        self, index: int, inputs: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Block `index` applied to `inputs` [n, L, H], batch by batch: [n, L, H'].

        H' may differ from H when a method changes the block's width (SliceGPT). `out`,
        when its shape fits, receives the outputs; it may be `inputs` itself, each batch
        being read before its outputs are written.
        """
        for start in range(0, inputs.shape[0], self.batch_size):
            h = inputs[start : start + self.batch_size].to(self.device)
            result = self.call_block(index, h)
            if out is None or out.shape[1:] != result.shape[1:] or out.dtype != result.dtype:
                shape = (inputs.shape[0], *result.shape[1:])
                if inputs.device.type == "cpu":
                    out = activation_buffer(shape, result.dtype, self.spill)
                else:
                    out = torch.empty(shape, dtype=result.dtype, device=inputs.device)
            out[start : start + h.shape[0]] = result.to(out.device)
        return out

    @torch.no_grad()
    def sweep_block(self, index: int, inputs: torch.Tensor) -> None:
        """Block `index` over `inputs` [n, L, H] for its hooks only; outputs are dropped."""
        for start in range(0, inputs.shape[0], self.batch_size):
            self.call_block(index, inputs[start : start + self.batch_size].to(self.device))

    def __iter__(self) -> Iterator[BlockContext]:
        blocks = self.adapter.blocks
        indices = range(len(blocks))
        if self.progress:
            indices = tqdm(indices, desc=self.progress, unit="block", leave=False)
        offload = self.adapter.offload
        for index in indices:
            if offload is not None:
                offload.load(index)
            block = blocks[index]
            home = next(block.parameters()).device
            block.to(self.device)
            ctx = BlockContext(self, index)
            dense_out = None
            if self.propagate == "dense":  # statistics from the pass that gives the outputs
                with attach_collectors(ctx.linears(), list(self.collect), self.device) as found:
                    dense_out = ctx.forward()
                ctx.stats = collected_stats(found)
            elif self.collect:
                ctx.stats = ctx.collect(self.collect)
            yield ctx
            if dense_out is None:
                reuse = ctx.inputs if self.overwrite_inputs else None
                dense_out = self.run_block(index, ctx.inputs, out=reuse)
            self.hidden = dense_out
            ctx.release()
            block.to(home)
            if offload is not None:
                offload.unload(index, keep=self.writes)
            release_free_memory()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc), so one block's temporaries do
    not raise the next block's resident memory; a no-op elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()
