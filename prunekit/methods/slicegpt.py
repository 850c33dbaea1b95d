"""SliceGPT (Ashkboos et al., ICLR 2024): rotate the residual stream onto its principal
directions and delete the least important ones.

After the norm scales are folded into the following linears (`rotate.fold_norms`), every
RMS norm is invariant to an orthogonal change of basis of the residual stream. For each
point of the stream (block inputs, attention-to-MLP residuals, block outputs) the
calibration activations' covariance XᵀX gives a basis Q sorted by eigenvalue; linears
reading the stream are rotated by Q, those writing it by Qᵀ, and only the first d
columns are kept. Where the bases before and after a sublayer differ, its residual
shortcut is multiplied by Q_inᵀ Q_out ([d, d]). Bases are computed on the already
sliced model's activations, block after block (the sequential engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine import COLLECTORS, BlockContext, SequentialRunner
from prunekit.errors import PrunekitError
from prunekit.export import SLICED_MODELING_FILE
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.models import sliced_modeling
from prunekit.models.adapter import ModelAdapter
from prunekit.models.loading import LoadedModel
from prunekit.rotate import (
    ATTENTION_INPUTS,
    MLP_INPUTS,
    check_rotatable,
    fold_norms,
    principal_basis,
    role_linears,
    rotate_embedding,
    rotate_inputs,
    rotate_outputs,
)


@dataclass
class SliceGPTConfig(MethodConfig):
    round_to: int = 8  # the sliced width is rounded down to a multiple of this


def sliced_width(hidden: int, ratio: float, round_to: int) -> int:
    """Residual width kept at slicing `ratio`: (1 - ratio) · hidden, rounded down."""
    if ratio == 0:
        return hidden
    width = int((1 - ratio) * hidden) // round_to * round_to
    return min(hidden, max(round_to, width))


def covariance(x: torch.Tensor) -> torch.Tensor:
    """XᵀX of activations [..., D] (scaled; the scale does not change the basis): [D, D]."""
    stat = COLLECTORS["hessian"](x.shape[-1], x.device)
    stat.update(x.reshape(-1, x.shape[-1]))
    return stat.result()


def _kept_energy(values: torch.Tensor, width: int) -> float:
    """Share of the activations' energy in the `width` largest principal directions."""
    values = values.clamp_min(0)
    return float(values[:width].sum() / values.sum().clamp_min(1e-30))


def _shortcut(matrix: torch.Tensor, like: nn.Module) -> nn.Parameter:
    weight = next(like.parameters())
    return nn.Parameter(matrix.to(weight.device, weight.dtype).contiguous(), requires_grad=False)


def block_parameters(adapter: ModelAdapter) -> int:
    """Parameters inside the decoder blocks (linears, shortcuts, norms)."""
    return sum(p.numel() for block in adapter.blocks for p in block.parameters())


@register
class SliceGPT(Method):
    name = "slicegpt"
    summary = "PCA-rotate the residual stream, delete its smallest directions (hidden width)"
    kind = "structured"
    supports_nm = False
    Config = SliceGPTConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        adapter = lm.adapter
        check_rotatable(adapter)
        sliced_class = f"Sliced{type(adapter.model).__name__}"
        if not hasattr(sliced_modeling, sliced_class):
            raise PrunekitError(f"slicegpt has no sliced model class for {adapter.model_type}")
        if request.layer_sparsity is not None:
            raise PrunekitError("slicegpt gives every block one width; use --allocation uniform")
        if self.config.round_to < 1:
            raise PrunekitError(f"round_to must be at least 1, got {self.config.round_to}")
        hidden = adapter.hidden_size
        width = sliced_width(hidden, request.sparsity, self.config.round_to)
        blocks_before = block_parameters(adapter)

        fold_norms(adapter)
        for index, block in enumerate(adapter.blocks):
            norms = adapter.norm(block, "attn"), adapter.norm(block, "mlp")
            adapter.blocks[index] = sliced_modeling.ShortcutDecoderLayer(block, *norms)

        runner = SequentialRunner(
            adapter, calib, request.device, request.batch_size, progress="slicegpt"
        )
        full, values = principal_basis(covariance(runner.hidden))
        basis = full[:, :width]
        energy = [_kept_energy(values, width)]
        rotate_embedding(adapter.embed, basis)
        for ctx in runner:
            if ctx.index == 0:
                ctx.inputs = (runner.hidden.double() @ basis).to(runner.hidden.dtype)
            basis, kept = self._slice_block(ctx, basis, width)
            energy.extend(kept)
        rotate_inputs(adapter.lm_head, basis)

        config = adapter.config
        config.sliced_hidden_size = width
        module = SLICED_MODELING_FILE.removesuffix(".py")
        config.auto_map = {"AutoModelForCausalLM": f"{module}.{sliced_class}"}
        return {
            "hidden_size": hidden,
            "sliced_hidden_size": width,
            "slicing_ratio": 1 - width / hidden,
            "block_parameters_before": blocks_before,
            "block_parameters_after": block_parameters(adapter),
            "kept_energy": [round(e, 6) for e in energy],
        }

    @staticmethod
    def _slice_block(
        ctx: BlockContext, basis_in: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, list[float]]:
        """Rotate and slice one block whose inputs are in `basis_in` [D, d]; return the
        basis of its outputs and the energy kept at its two new bases."""
        adapter, layer = ctx.adapter, ctx.block
        for linear in role_linears(adapter, layer, ATTENTION_INPUTS):
            rotate_inputs(linear, basis_in)
        layer.attn_shortcut = _shortcut(basis_in.t(), layer)  # back to the full stream
        stats = ctx.collect(["hessian"], {"mid": layer.post_attention_layernorm})
        full, values = principal_basis(stats["mid"]["hessian"])
        basis_mid = full[:, :width].to(basis_in.device)
        kept = [_kept_energy(values, width)]

        rotate_outputs(adapter.linear(layer, "o"), basis_mid)
        layer.attn_shortcut = _shortcut(basis_in.t() @ basis_mid, layer)
        for linear in role_linears(adapter, layer, MLP_INPUTS):
            rotate_inputs(linear, basis_mid)
        layer.mlp_shortcut = _shortcut(basis_mid.t(), layer)
        full, values = principal_basis(covariance(ctx.forward()))
        basis_out = full[:, :width].to(basis_in.device)
        kept.append(_kept_energy(values, width))

        rotate_outputs(adapter.linear(layer, "down"), basis_out)
        layer.mlp_shortcut = _shortcut(basis_mid.t() @ basis_out, layer)
        return basis_out, kept
