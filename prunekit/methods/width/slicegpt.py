"""SliceGPT (Ashkboos et al., ICLR 2024): rotate the residual stream onto its principal
directions and delete the least important ones.

After the norm scales are folded into the following linears (`rotate.fold_*_norm*`), every
RMS norm is invariant to an orthogonal change of basis of the residual stream. For each
point of the stream (block inputs, attention-to-MLP residuals, block outputs) the
calibration activations' covariance XᵀX gives a basis Q sorted by eigenvalue; linears
reading the stream are rotated by Q, those writing it by Qᵀ, and only the first d
columns are kept. Where the bases before and after a sublayer differ, its residual
shortcut is multiplied by Q_inᵀ Q_out ([d, d]). Bases are computed on the already
sliced model's activations, block after block (the sequential engine).

As in the reference (`do_slice_head=False`), the last block's MLP output and the LM head
stay at the full width D: the last block's output basis is the whole rotation Q, so the
head sees every direction. `--opt slice_head=true` slices them to d as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine import COLLECTORS, BlockContext, SequentialRunner
from prunekit.errors import PrunekitError, choice_error
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.methods.width.base import check_reachable
from prunekit.models import sliced_modeling
from prunekit.models.adapter import ModelAdapter
from prunekit.models.loading import LoadedModel
from prunekit.surgery.rotate import (
    ATTENTION_INPUTS,
    MLP_INPUTS,
    check_rotatable,
    fold_block_norms,
    fold_final_norm,
    principal_basis,
    role_linears,
    rotate_embedding,
    rotate_inputs,
    rotate_outputs,
)
from prunekit.surgery.width import decoder_parameters

BUDGETS = ("width", "parameters")


@dataclass
class SliceGPTConfig(MethodConfig):
    round_to: int = 8  # the sliced width is rounded down to a multiple of this
    budget: str = "width"  # what sparsity measures: hidden width, or decoder parameters
    slice_head: bool = False  # also slice the last block's output and the LM head

    def __post_init__(self) -> None:
        if self.round_to < 1:
            raise PrunekitError(f"round_to must be at least 1, got {self.round_to}")
        if self.budget not in BUDGETS:
            raise choice_error("budget", self.budget, BUDGETS)


def sliced_width(hidden: int, ratio: float, round_to: int) -> int:
    """Residual width kept at slicing `ratio`: (1 - ratio) · hidden, rounded down."""
    if ratio == 0:
        return hidden
    width = int((1 - ratio) * hidden) // round_to * round_to
    return min(hidden, max(round_to, width))


def sliced_parameters(adapter: ModelAdapter, width: int, slice_head: bool = True) -> int:
    """Decoder-block parameters once sliced to `width`: rotated linears, [d, d] shortcuts
    (two per block) and weightless norms; without `slice_head` the last block's down and
    MLP shortcut write the full width D."""
    total = 0
    last = adapter.num_layers - 1
    for index, block in enumerate(adapter.blocks):
        out_width = width if slice_head or index < last else adapter.hidden_size
        for role in adapter.spec.linears:
            linear = adapter.linear(block, role)
            out_features, in_features = linear.weight.shape
            bias = linear.bias is not None
            if role in ATTENTION_INPUTS + MLP_INPUTS:
                total += out_features * width + bias * out_features
            elif role == "down":
                total += out_width * in_features + bias * out_width
            else:  # o writes the residual stream
                total += width * in_features + bias * width
        total += width * width + width * out_width
    return total


def width_for_parameters(
    adapter: ModelAdapter, share: float, round_to: int, slice_head: bool = True
) -> int:
    """The largest width (a multiple of `round_to`) whose sliced decoder has at most
    (1 − share) of the current decoder parameters."""
    hidden = adapter.hidden_size
    if share == 0:
        return hidden
    limit = (1 - share) * decoder_parameters(adapter)
    width = hidden // round_to * round_to
    while width > round_to and sliced_parameters(adapter, width, slice_head) > limit:
        width -= round_to
    return width


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


@register
class SliceGPT(Method):
    name = "slicegpt"
    summary = "PCA-rotate the residual stream, delete its smallest directions (hidden width)"
    kind = "structured"
    supports_nm = False
    sparsity_meaning = (
        "slicing ratio: share of the hidden width deleted (budget=params: of decoder-block "
        "parameters)"
    )
    no_allocation = "slicegpt gives every block one width"
    streams = True  # one pass over the blocks in order; embedding and head stay in memory
    Config = SliceGPTConfig

    def outcome(self, details: dict) -> str:
        hidden, width = details["hidden_size"], details["sliced_hidden_size"]
        return (
            f"hidden width {hidden} -> {width} (slicing ratio {details['slicing_ratio']:.3f}, "
            f"rounded to round_to={self.config.round_to}); {super().outcome(details)}, "
            "shortcut matrices included"
        )

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        adapter = lm.adapter
        check_rotatable(adapter)
        sliced_class = f"Sliced{type(adapter.model).__name__}"
        if not hasattr(sliced_modeling, sliced_class):
            raise PrunekitError(f"slicegpt has no sliced model class for {adapter.model_type}")
        hidden, round_to = adapter.hidden_size, self.config.round_to
        before = decoder_parameters(adapter)
        if self.config.budget == "width":
            most = 1 - round_to / hidden
            if request.sparsity > most + 1e-9:
                raise PrunekitError(
                    f"slicegpt keeps at least round_to={round_to} of {hidden} hidden "
                    f"dimensions; valid: sparsity (slicing ratio) <= {most:.3f}"
                )
            width = sliced_width(hidden, request.sparsity, round_to)
        else:
            floor = sliced_parameters(adapter, round_to, self.config.slice_head)
            check_reachable(
                self.name,
                request.sparsity,
                1 - floor / before,
                f"the hidden width stays at least round_to={round_to}",
            )
            width = width_for_parameters(
                adapter, request.sparsity, round_to, self.config.slice_head
            )

        fold_final_norm(adapter)  # each block's norms are folded when the engine reaches it
        for index, block in enumerate(adapter.blocks):
            norms = adapter.norm(block, "attn"), adapter.norm(block, "mlp")
            adapter.blocks[index] = sliced_modeling.ShortcutDecoderLayer(block, *norms)

        runner = SequentialRunner(
            adapter, calib, request.device, request.batch_size, progress="slicegpt", writes=True
        )
        full, values = principal_basis(covariance(runner.hidden))
        basis = full[:, :width]
        energy = [_kept_energy(values, width)]
        rotate_embedding(adapter.embed, basis)
        last = adapter.num_layers - 1
        out_width = width if self.config.slice_head else hidden
        for ctx in runner:
            if ctx.index == 0:
                ctx.inputs = (runner.hidden.double() @ basis).to(runner.hidden.dtype)
            basis, kept = self._slice_block(
                ctx, basis, width, out_width if ctx.index == last else width
            )
            energy.extend(kept)
        rotate_inputs(adapter.lm_head, basis)

        config = adapter.config
        config.sliced_hidden_size = width
        config.sliced_output_size = out_width
        module = sliced_modeling.MODELING_FILE.removesuffix(".py")
        config.auto_map = {"AutoModelForCausalLM": f"{module}.{sliced_class}"}
        return {
            "hidden_size": hidden,
            "sliced_hidden_size": width,
            "head_width": out_width,
            "slicing_ratio": 1 - width / hidden,
            "decoder_parameters_before": before,
            "decoder_parameters_after": decoder_parameters(adapter),
            "decoder_share_removed": round(1 - decoder_parameters(adapter) / before, 6),
            "kept_energy": [round(e, 6) for e in energy],
        }

    @staticmethod
    def _slice_block(
        ctx: BlockContext, basis_in: torch.Tensor, width: int, out_width: int
    ) -> tuple[torch.Tensor, list[float]]:
        """Rotate and slice one block whose inputs are in `basis_in` [D, d]; return the
        basis of its outputs [D, out_width] and the energy kept at its two new bases."""
        adapter, layer = ctx.adapter, ctx.block
        fold_block_norms(adapter, layer)
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
        basis_out = full[:, :out_width].to(basis_in.device)
        kept.append(_kept_energy(values, out_width))

        rotate_outputs(adapter.linear(layer, "down"), basis_out)
        layer.mlp_shortcut = _shortcut(basis_mid.t() @ basis_out, layer)
        return basis_out, kept
