"""Accuracy-predictor allocation search: sampled vectors and the result meet the target
mean exactly, the predictor's pick is recorded against the measured samples, and bad
requests are refused."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.allocations.predictor import PredictorConfig, mutate, project_mean, sample_vectors


def test_projection_and_mutation_keep_the_mean_exactly():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        raw = torch.rand(7, generator=gen, dtype=torch.float64)
        projected = project_mean(raw, 0.6, 0.95)
        assert float(projected.mean()) == pytest.approx(0.6, abs=1e-12)
        assert float(projected.min()) >= 0 and float(projected.max()) <= 0.95
        child = mutate(projected, gen, 0.2, 0.95)
        assert float(child.mean()) == pytest.approx(0.6, abs=1e-12)
        assert float(child.min()) >= 0 and float(child.max()) <= 0.95 + 1e-12
    vectors = sample_vectors(5, 0.5, PredictorConfig(samples=6), gen)
    assert torch.equal(vectors[0], torch.full((5,), 0.5, dtype=torch.float64))
    assert torch.allclose(vectors.mean(1), torch.full((6,), 0.5, dtype=torch.float64))


def test_search_meets_the_target_and_records_the_samples(stories, tmp_path):
    path = tmp_path / "calib.txt"
    from prunekit.data import load_text

    path.write_text(load_text("tinyshakespeare", purpose="calib").text[:20000])
    record = prunekit.prune(
        stories,
        "wanda",
        sparsity=0.5,
        calib=str(path),
        nsamples=4,
        seqlen=64,
        allocation="predictor:samples=6,generations=5,population=16",
    )
    facts = record.details["allocation"]
    ratios = facts["ratios"]
    assert len(ratios) == 5 and sum(ratios) / 5 == pytest.approx(0.5, abs=1e-9)
    assert len(facts["sampled_ppl"]) == 6 and facts["uniform_ppl"] == facts["sampled_ppl"][0]
    for i, block in enumerate(stories.adapter.blocks):  # each block pruned at its ratio
        w = stories.adapter.linear(block, "q").weight
        assert float((w == 0).float().mean()) == pytest.approx(ratios[i], abs=1 / 64)


def test_nm_and_structured_requests_are_refused(stories):
    with pytest.raises(prunekit.PrunekitError):
        prunekit.prune(
            stories,
            "wanda",
            pattern="2:4",
            calib="tinystories",
            nsamples=2,
            seqlen=32,
            allocation="predictor:samples=4",
        )
