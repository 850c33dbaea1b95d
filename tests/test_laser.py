"""LASER: full rank reproduces the logits, the rank-k weight equals an independent
truncated SVD (exact) and torch.svd_lowrank with the same seed (reference), factored
storage is smaller and reloads with identical logits, the search applies its best entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.export.record import count_parameters

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _laser(lm, sparsity, **options):
    return prunekit.prune(
        lm, "laser", sparsity=sparsity, calib=CALIB, nsamples=2, seqlen=32, options=options
    )


CALIB = "tinystories"


@pytest.mark.parametrize("svd, tol", [("exact", 1e-4), ("lowrank", 1e-3)])
def test_full_rank_reproduces_the_logits(stories, svd, tol):
    before = _logits(stories.model)
    _laser(stories, 0.0, layers="all", matrices="all", svd=svd)
    torch.testing.assert_close(_logits(stories.model), before, atol=tol, rtol=tol)


def test_rank_k_weight_equals_an_independent_svd(stories):
    block = stories.adapter.blocks[-1]
    w = stories.adapter.linear(block, "up").weight.detach().double().numpy()
    _laser(stories, 0.75, matrices="up", svd="exact")  # rho 0.25
    k = int(0.25 * min(w.shape))
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    expected = (u[:, :k] * s[:k]) @ vh[:k]
    got = stories.adapter.linear(stories.adapter.blocks[-1], "up").weight.detach().double()
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_reference_svd_lowrank_with_the_same_seed(stories):
    w = stories.adapter.linear(stories.adapter.blocks[2], "down").weight.detach().clone()
    _laser(stories, 0.5, layers="2", matrices="down")
    torch.manual_seed(0)  # the method seeds with --seed (0)
    u, s, v = torch.svd_lowrank(w, q=int(min(w.shape) * 0.5), niter=2)
    expected = u @ torch.diag(s) @ v.T
    got = stories.adapter.linear(stories.adapter.blocks[2], "down").weight
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_factored_model_is_smaller_and_reloads(stories, tmp_path):
    before = count_parameters(stories.model)
    record = _laser(stories, 0.9, layers="3,4", matrices="up,down")
    assert all(a["factored"] for a in record.details["applied"])
    assert count_parameters(stories.model) < before
    logits = _logits(stories.model)
    out = prunekit.save(stories, tmp_path / "laser", record)
    assert torch.equal(_logits(prunekit.load_pruned(out).model), logits)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(_logits(plain), logits)


def test_search_applies_the_best_scored_intervention(stories):
    record = _laser(stories, 0.0, layers="-1", matrices="up,down", search=True, svd="exact")
    scores = record.details["search"][1:]
    assert len(scores) == 2 * 9
    best = min(scores, key=lambda s: s["nll"])
    if best["nll"] < record.details["search"][0]["dense_nll"]:
        assert record.details["chosen"] == [best["block"], best["matrix"], best["rho"]]
    else:
        assert record.details["chosen"] is None and record.details["applied"] == []


def test_bad_layers_and_matrices_are_rejected(stories):
    with pytest.raises(prunekit.PrunekitError, match="out of range"):
        _laser(stories, 0.5, layers="9")
    with pytest.raises(prunekit.PrunekitError, match="unknown matrix"):
        _laser(stories, 0.5, matrices="fc_in")
