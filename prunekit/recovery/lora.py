"""Low-rank adapters for healing: peft's LoRA, and masked LoRA that keeps the sparsity.

- `add_peft_lora`: peft's LoRA (`y = W x + s·B A x`) on the named linears; merging it
  fills the pruned zeros unless the merge re-applies the mask (`merge_peft_lora`).
- `add_masked_lora`: PERP's MaskLoRA (Zimmer et al.): the weight is re-parametrised as
  `W + s·(B A) ⊙ M` with `M = (W != 0)` (torch.nn.utils.parametrize), so the trained
  update never touches a pruned weight; merging it is exact and keeps every zero and
  every N:M group.
Both initialise as peft does: A Kaiming-uniform (a = √5), B zero, `s = alpha / rank`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter


def target_linears(adapter: ModelAdapter, roles: list[str]) -> dict[str, nn.Module]:
    """`{module name: linear}` of the given roles (e.g. q, v, down) in every block."""
    unknown = sorted(set(roles) - set(adapter.spec.linears))
    if unknown:
        raise PrunekitError(
            f"unknown LoRA target {', '.join(unknown)}; valid: {', '.join(adapter.spec.linears)}"
        )
    names = {id(m): n for n, m in adapter.model.named_modules()}
    return {
        names[id(adapter.linear(block, role))]: adapter.linear(block, role)
        for block in adapter.blocks
        for role in roles
    }


class MaskedLowRank(nn.Module):
    """Parametrisation `W -> W + s·(B A) ⊙ M` of a [out, in] weight; A [r, in], B [out, r]."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        self.register_buffer("mask", (weight != 0).to(weight.dtype))
        a = torch.empty(rank, in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=√5) on [r, in]
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_b @ self.lora_a) * self.scale * self.mask


def add_masked_lora(
    linears: dict[str, nn.Module], rank: int, alpha: float, seed: int
) -> list[nn.Parameter]:
    """Attach MaskedLowRank to every linear's weight; the new (trainable) parameters."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for linear in linears.values():
        lora = MaskedLowRank(linear.weight.detach(), rank, alpha, generator)
        parametrize.register_parametrization(linear, "weight", lora)
        params += [lora.lora_a, lora.lora_b]
    return params


def merge_masked_lora(linears: dict[str, nn.Module]) -> None:
    """Fold each masked update into its weight (bit-identical to the trained forward)."""
    for linear in linears.values():
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)


def add_peft_lora(
    model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float
) -> nn.Module:
    """peft's LoRA on the linears `names` (full module names); returns the PeftModel."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise PrunekitError("heal --method lora needs peft: pip install 'prunekit[heal]'") from err
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    return get_peft_model(model, config)


def merge_peft_lora(peft_model: nn.Module, keep_mask: bool) -> nn.Module:
    """Merge the adapters into the base model and return it; with `keep_mask` every
    weight that was zero before the merge is zero after it."""
    zeros = {}
    if keep_mask:
        for name, module in peft_model.named_modules():
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(base, "weight"):
                zeros[name] = base.weight == 0
    merged = peft_model.merge_and_unload()
    if keep_mask:
        modules = dict(merged.named_modules())
        for name, mask in zeros.items():
            key = name.removeprefix("base_model.model.")
            with torch.no_grad():
                modules[key].weight.masked_fill_(mask, 0.0)
    return merged
