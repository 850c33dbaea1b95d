"""The shared speed timers of `prunekit.eval.speed`: call order of the interleaved
measurement, medians, and the prompt and timers on the real stories260K."""

from __future__ import annotations

import json

import torch
from helpers import run_cli

import prunekit
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


def test_speed_command_times_model_and_baseline_and_the_sparse_kernel(stories, tmp_path):
    record = prunekit.prune(stories, "magnitude", sparsity=0.5)
    folder = prunekit.save(stories, tmp_path / "m50", record)
    out = tmp_path / "speed.json"
    done = run_cli(
        "speed",
        str(folder),
        "--baseline",
        "stories260k",
        "--prefill",
        "16",
        "--decode",
        "4",
        "--batch",
        "1,2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(out.read_text())
    for name in ("model", "baseline"):
        for batch in ("batch 1", "batch 2"):
            row = payload["speed"][name][batch]
            assert row["prefill_tok_s"]["median"] > 0 and row["decode_tok_s"]["median"] > 0
            assert row["prefill_tok_s"]["min"] <= row["prefill_tok_s"]["max"]
    assert set(payload["sparse_matmul"]) == {"1 tokens", "16 tokens"}
    assert "decode speed-up over the baseline at batch 1" in done.stdout
    bad = run_cli("speed", "stories260k", "--batch", "0,x", cwd=tmp_path)
    assert bad.returncode == 2 and "--batch must be positive integers" in bad.stderr
