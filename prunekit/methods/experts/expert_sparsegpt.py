"""SparseGPT inside the experts of a mixture-of-experts model, block by block, with each
expert's Hessian from the tokens routed to it.

The sequential engine runs one block at a time; a pre-hook on the block's experts module
sums, per expert e, XᵀX of the routed inputs of its fused gate/up weight [2I, H] and of
its down weight (act(gate) · up) [H, I]. Each reached expert's two weights are then
pruned and updated by SparseGPT (`sparsegpt_prune`, the reference's layer scope by
default) and the pruned block's outputs feed the next block. An expert that no
calibration token reached is left dense and listed in the record. Attention linears are
not touched: run a mask method before it (a recipe). Memory: the block's Hessians,
E · (H² + I²) float32 values.
"""

from __future__ import annotations

import torch

from prunekit.engine.runner import SequentialRunner
from prunekit.errors import PrunekitError
from prunekit.methods.base import Method, PruneRequest, register
from prunekit.methods.experts.routed import RoutedSums
from prunekit.methods.unstructured.sparsegpt import SparseGPTConfig, sparsegpt_prune
from prunekit.models.loading import LoadedModel


def gram(tokens: torch.Tensor) -> torch.Tensor:
    """XᵀX of tokens [t, F]: [F, F]."""
    return tokens.T @ tokens


@register
class ExpertSparseGPT(Method):
    name = "expert_sparsegpt"
    summary = "SparseGPT inside every expert, from the tokens routed to it (MoE)"
    kind = "experts"
    Config = SparseGPTConfig
    default_scope = "layer"
    sparsity_meaning = "share of weights zeroed in every expert weight"

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        adapter, config = lm.adapter, self.config
        if not adapter.spec.moe:
            raise PrunekitError(
                f"expert_sparsegpt needs a mixture-of-experts model; "
                f"got {adapter.config.model_type}"
            )
        if calib is None:
            raise PrunekitError("method 'expert_sparsegpt' needs calibration data")
        runner = SequentialRunner(
            adapter, calib, request.device, request.batch_size, request.propagate,
            overwrite_inputs=True,
        )  # fmt: skip
        unreached = {}
        for ctx in runner:
            moe = adapter.moe(ctx.block)
            stats = RoutedSums(moe, gram)
            try:
                runner.sweep_block(ctx.index, ctx.inputs)
            finally:
                stats.handle.remove()
            target, missed = request.target(ctx.index), []
            with torch.no_grad():
                for weight, hessian in stats.reached_weights(moe, missed):
                    new, _ = sparsegpt_prune(
                        weight, hessian.to(weight.device), target, config.blocksize,
                        config.percdamp,
                    )  # fmt: skip
                    weight.copy_(new.to(weight.dtype))
            if missed:
                unreached[str(ctx.index)] = missed
        return {"experts_no_calibration_token_reached": unreached}
