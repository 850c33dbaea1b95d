"""The shared speed timers of `prunekit.eval.speed`: call order of the interleaved
measurement, medians, and the prompt and timers on the real stories260K."""

from __future__ import annotations

import torch

from prunekit.eval.speed import (
    decode_seconds,
    forward_seconds,
    interleaved,
    medians,
    prefill_seconds,
    prompt_ids,
)


def test_interleaved_warms_up_once_then_measures_in_turn():
    calls: list[str] = []
    values = iter(range(100))

    def measure(name: str) -> dict[str, float]:
        calls.append(name)
        return {"a": next(values), "b": -1.0}

    samples = interleaved({"x": "x", "y": "y"}, measure, 3, warmup=lambda m: calls.append(f"w{m}"))
    assert calls == ["wx", "wy", "x", "y", "x", "y", "x", "y"]
    assert samples == {
        "x": {"a": [0, 2, 4], "b": [-1.0] * 3},
        "y": {"a": [1, 3, 5], "b": [-1.0] * 3},
    }
    assert medians(samples["y"]) == {"a": 3, "b": -1.0}


def test_timers_run_the_model(stories):
    ids = prompt_ids(stories.tokenizer, 16)
    assert ids.shape == (1, 16) and ids.dtype == torch.long
    model = stories.model
    assert forward_seconds(model, ids) > 0
    assert prefill_seconds(model, ids) > 0
    assert decode_seconds(model, ids, 3) > 0
