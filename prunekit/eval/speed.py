"""CPU inference speed at batch 1: prefill and KV-cached decode throughput (tokens/s)."""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import DynamicCache


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Wall time of one prefill of `ids` [1, L] that fills a KV cache and computes the
    next-token logits only (as generation does)."""
    start = time.perf_counter()
    model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of `new_tokens` greedy decode steps after prefilling `ids` [1, L]
    (the prefill is not timed)."""
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start
