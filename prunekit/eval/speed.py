"""CPU inference speed at batch 1: prefill, KV-cached decode and scoring-forward timers
(seconds), and interleaved repeated measurement of several models with medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from transformers import DynamicCache

from prunekit.data import evaluation_windows, load_text

M = TypeVar("M")


def prompt_ids(tokenizer: object, tokens: int, dataset: str = "wikitext2") -> torch.Tensor:
    """The timing prompt: the first `tokens` tokens of `dataset`'s test split, [1, tokens]."""
    text = load_text(dataset, purpose="eval").text
    return evaluation_windows(tokenizer, text, tokens, limit=1)


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


@torch.no_grad()
def forward_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Wall time of one forward over `ids` [1, L] without a KV cache, with logits at every
    position (scoring-style, unlike `prefill_seconds`' generation prefill)."""
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def interleaved(
    models: dict[str, M],
    measure: Callable[[M], dict[str, float]],
    repeats: int,
    warmup: Callable[[M], object] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Measure every model in turn, `repeats` rounds (after one `warmup` call per model),
    so that load from others on the machine spreads over all of them alike.

    `measure(model)` gives `{kind: value}` (e.g. seconds per phase); the result is
    `{model name: {kind: [value per round]}}`.
    """
    if warmup is not None:
        for model in models.values():
            warmup(model)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            for kind, value in measure(model).items():
                samples[name].setdefault(kind, []).append(value)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each kind's values: `{kind: median}`."""
    return {kind: statistics.median(values) for kind, values in samples.items()}
