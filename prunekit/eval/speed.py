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


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def speed_table(
    models: dict[str, nn.Module],
    prompt: torch.Tensor,
    decode: int,
    batches: list[int],
    repeats: int,
) -> dict[str, dict[str, dict]]:
    """Prefill and decode throughput of every model at every batch size, measured
    interleaved: `{model: {"batch B": {"prefill_tok_s", "decode_tok_s",
    "decode_ms_per_token"}}}`, each a `spread` over `repeats`."""
    table: dict[str, dict[str, dict]] = {name: {} for name in models}
    for batch in batches:
        ids = prompt.expand(batch, -1).contiguous()
        samples = interleaved(
            models,
            lambda model, ids=ids: {
                "prefill": prefill_seconds(model, ids),
                "decode": decode_seconds(model, ids, decode),
            },
            repeats,
            warmup=lambda model, ids=ids: decode_seconds(model, ids, 1),
        )
        tokens = batch * ids.shape[1]
        for name, kinds in samples.items():
            table[name][f"batch {batch}"] = {
                "prefill_tok_s": spread([tokens / s for s in kinds["prefill"]]),
                "decode_tok_s": spread([batch * decode / s for s in kinds["decode"]]),
                "decode_ms_per_token": spread([1000 * s / decode for s in kinds["decode"]]),
            }
    return table


@torch.no_grad()
def sparse_matmul(weight: torch.Tensor, tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds of x @ Wᵀ for x [tokens, in], dense and with W in torch's CSR
    layout (float32), and their ratio (> 1: the sparse kernel is slower)."""
    w = weight.detach().float()
    x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(0))
    csr = w.to_sparse_csr()

    def timed(fn) -> float:
        fn()
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            values.append(time.perf_counter() - start)
        return statistics.median(values)

    dense = timed(lambda: x @ w.t())
    sparse = timed(lambda: (csr @ x.t()).t())
    return {"dense_s": dense, "csr_s": sparse, "csr_over_dense": sparse / dense}


def llamacpp_table(
    paths: dict[str, str], prompt: list[int], decode: int, repeats: int, threads: int
) -> dict[str, dict[str, dict]]:
    """Prefill and decode throughput of GGUF files in llama.cpp (llama-cpp-python), batch 1,
    measured interleaved: the same shape as `speed_table`'s rows under "batch 1"."""
    from llama_cpp import Llama

    models = {
        name: Llama(model_path=path, n_ctx=len(prompt) + decode + 8, n_threads=threads,
                    verbose=False)
        for name, path in paths.items()
    }  # fmt: skip

    def measure(llm) -> dict[str, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode):  # greedy: sample at temperature 0, feed the token back
            llm.eval([llm.sample(temp=0.0)])
        return {"prefill": prefill, "decode": time.perf_counter() - start}

    samples = interleaved(models, measure, repeats, warmup=measure)
    return {
        name: {
            "batch 1": {
                "prefill_tok_s": spread([len(prompt) / s for s in kinds["prefill"]]),
                "decode_tok_s": spread([decode / s for s in kinds["decode"]]),
                "decode_ms_per_token": spread([1000 * s / decode for s in kinds["decode"]]),
            }
        }
        for name, kinds in samples.items()
    }
