"""Physical removal of residual-stream (hidden) dimensions, as Sheared LLaMA prunes
`hidden_z`: the same kept coordinates in every place that reads or writes the stream.

Kept coordinates stay in their order. What shrinks, with D the hidden size:
- the token embedding's columns [vocab, D] and the LM head's input columns;
- every block's attention and MLP input linears (columns) and o / down (rows, bias);
- the pre-norms' and the final norm's scales [D].

RMSNorm then averages over the kept coordinates only, which is what the masked model
computes while training (`methods/learned/hard_concrete.py`). Only RMS pre-norm models
qualify (a LayerNorm's mean or a post-sublayer norm would mix the removed coordinates).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.models.adapter import ModelAdapter
from prunekit.surgery.rotate import ATTENTION_INPUTS, MLP_INPUTS, check_rotatable, role_linears
from prunekit.surgery.width import check_indices, shrink_linear

OUTPUTS = ("o", "down")


def _keep_norm(norm: nn.Module, index: torch.Tensor) -> None:
    weight = norm.weight.data.index_select(0, index.to(norm.weight.device))
    norm.weight = nn.Parameter(weight.contiguous(), requires_grad=norm.weight.requires_grad)
    if hasattr(norm, "hidden_size"):
        norm.hidden_size = weight.numel()


def keep_hidden(adapter: ModelAdapter, kept: Sequence[int]) -> None:
    """Keep only the residual coordinates `kept` (distinct, in [0, hidden_size)) in place;
    the config's `hidden_size` becomes len(kept), with `head_dim` made explicit."""
    check_rotatable(adapter)
    index = check_indices("hidden dimension", kept, adapter.hidden_size)
    config, head_dim = adapter.config, adapter.head_dim
    embed, head = adapter.embed, adapter.lm_head
    tied = head.weight is embed.weight
    weight = embed.weight.data.index_select(1, index.to(embed.weight.device))
    embed.weight = nn.Parameter(weight.contiguous(), requires_grad=embed.weight.requires_grad)
    embed.embedding_dim = weight.shape[1]
    if tied:
        head.weight = embed.weight
        head.in_features = weight.shape[1]
    else:
        shrink_linear(head, cols=index)
    for block in adapter.blocks:
        for linear in role_linears(adapter, block, ATTENTION_INPUTS + MLP_INPUTS):
            shrink_linear(linear, cols=index)
        for linear in role_linears(adapter, block, OUTPUTS):
            shrink_linear(linear, rows=index)
        for role in adapter.spec.norms:
            _keep_norm(adapter.norm(block, role), index)
    _keep_norm(adapter.final_norm, index)
    config.head_dim = head_dim
    config.hidden_size = index.numel()
