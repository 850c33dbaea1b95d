"""Remove whole experts from a mixture-of-experts block: the router's rows, the experts'
slices of every fused weight, and the expert counts in the modules and the config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapter import ModelAdapter

COUNT_KEYS = ("num_local_experts", "num_experts")  # Mixtral / Qwen-MoE, OLMoE


def expert_count(moe: nn.Module) -> int:
    return int(moe.gate.weight.shape[0])


def top_k(moe: nn.Module) -> int:
    return int(getattr(moe.gate, "top_k", None) or moe.top_k)


def keep_experts(moe: nn.Module, kept: Sequence[int]) -> None:
    """Keep experts `kept` (sorted indices) of one MoE module, in place."""
    total = expert_count(moe)
    index = torch.tensor(sorted(kept), dtype=torch.long)
    if len(set(kept)) != len(kept) or index.numel() == 0 or int(index.max()) >= total:
        raise PrunekitError(f"kept experts {list(kept)} invalid for {total} experts")
    if index.numel() < top_k(moe):
        raise PrunekitError(
            f"keeping {index.numel()} experts would leave fewer than top_k={top_k(moe)}"
        )
    for module in (moe.gate, moe.experts):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.shape and param.shape[0] == total:
                setattr(module, name, nn.Parameter(param.data[index].clone(), param.requires_grad))
        if hasattr(module, "num_experts"):
            module.num_experts = index.numel()


def update_expert_config(adapter: ModelAdapter) -> None:
    """Write the (uniform) expert count into the config; refuse differing counts."""
    counts = {expert_count(adapter.moe(block)) for block in adapter.blocks}
    if len(counts) != 1:
        raise PrunekitError(f"blocks kept different expert counts {sorted(counts)}")
    for key in COUNT_KEYS:
        if getattr(adapter.config, key, None) is not None:
            setattr(
                adapter.config,
                key,
                counts.pop() if counts else expert_count(adapter.moe(adapter.blocks[0])),
            )
