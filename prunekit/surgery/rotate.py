"""Computational invariance helpers (SliceGPT): fold norm scales into linears, rotate
linears' inputs or outputs by an orthogonal basis, principal bases of covariances.

All rotations are done in float64 and written back in the module's dtype. A basis is
[D, d]: its columns are orthonormal directions of the D-wide residual stream.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter
from prunekit.models.sliced_modeling import WeightlessRMSNorm

ATTENTION_INPUTS = ("q", "k", "v", "qkv")
MLP_INPUTS = ("gate", "up", "gate_up")


def check_rotatable(adapter: ModelAdapter) -> None:
    """Fail unless the residual stream is touched only by RMS pre-norms and residual adds."""
    spec = adapter.spec
    if spec.norm_kind not in ("rms", "rms_offset") or spec.output_norms:
        kind = "post-sublayer norms" if spec.output_norms else f"{spec.norm_kind} norms"
        raise PrunekitError(
            f"rotation needs RMSNorm pre-norm models (llama, mistral, qwen2, qwen3, gemma, "
            f"phi3); {adapter.model_type} has {kind}"
        )


def role_linears(
    adapter: ModelAdapter, block: nn.Module, roles: tuple[str, ...]
) -> list[nn.Linear]:
    """The block's linears with any of `roles`, in role order."""
    return [adapter.linear(block, r) for r in roles if r in adapter.spec.linears]


def _set_weight(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    dtype = linear.weight.dtype
    linear.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape


def scale_inputs(linear: nn.Linear, scale: torch.Tensor) -> None:
    """W ← W · diag(scale): the layer now expects inputs not yet multiplied by `scale` [in]."""
    weight = linear.weight.data.double() * scale.to(linear.weight.device).double()
    _set_weight(linear, weight, None)


def rotate_inputs(linear: nn.Linear, basis: torch.Tensor) -> None:
    """W [out, D] ← W · basis [D, d]: the layer reads coordinates in `basis`."""
    weight = linear.weight.data.double() @ basis.to(linear.weight.device).double()
    _set_weight(linear, weight, None)


def rotate_outputs(linear: nn.Linear, basis: torch.Tensor) -> None:
    """W [D, in] ← basisᵀ · W, b ← b · basis: the layer writes coordinates in `basis`."""
    basis = basis.to(linear.weight.device).double()
    weight = basis.t() @ linear.weight.data.double()
    bias = None if linear.bias is None else linear.bias.data.double() @ basis
    _set_weight(linear, weight, bias)


def principal_basis(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors [D, D] (columns, float64) and eigenvalues [D] sorted largest first."""
    values, vectors = torch.linalg.eigh(covariance.double())
    order = torch.argsort(values, descending=True)
    return vectors[:, order], values[order]


def untie_head(adapter: ModelAdapter) -> None:
    """Give the LM head its own weight (a tied head would change with the embedding)."""
    head = adapter.lm_head
    if head.weight is adapter.embed.weight:
        head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
    adapter.config.tie_word_embeddings = False


def fold_block_norms(adapter: ModelAdapter, block: nn.Module) -> None:
    """Move `block`'s two norm scales into the linears they feed; its norms become
    `WeightlessRMSNorm(hidden_size)` and the block computes the same function (exactly,
    up to rounding)."""
    for role, inputs in (("attn", ATTENTION_INPUTS), ("mlp", MLP_INPUTS)):
        norm = adapter.norm(block, role)
        for linear in role_linears(adapter, block, inputs):
            scale_inputs(linear, adapter.norm_scale(norm))
        norm = WeightlessRMSNorm(adapter.hidden_size, adapter.norm_eps(norm))
        adapter.set_norm(block, role, norm)


def fold_final_norm(adapter: ModelAdapter) -> None:
    """Move the final norm's scale into the (untied) LM head; the norm becomes weightless."""
    check_rotatable(adapter)
    untie_head(adapter)
    final = adapter.final_norm
    scale_inputs(adapter.lm_head, adapter.norm_scale(final))
    adapter.set_final_norm(WeightlessRMSNorm(adapter.hidden_size, adapter.norm_eps(final)))


def rotate_embedding(embed: nn.Embedding, basis: torch.Tensor) -> None:
    """E [vocab, D] ← E · basis [D, d]: token vectors in `basis` coordinates."""
    weight = embed.weight.data.double() @ basis.to(embed.weight.device).double()
    embed.weight = nn.Parameter(weight.to(embed.weight.dtype), requires_grad=False)
    embed.embedding_dim = weight.shape[1]
