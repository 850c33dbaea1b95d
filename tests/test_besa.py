"""BESA: learned sparsity per layer / row that ends exactly at each block's target,
reproducible with a seed, on stories260K and tiny GLU / non-GLU (GPT-2 Conv1D) models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import prunekit
from prunekit.methods import PruneRequest
from prunekit.methods.unstructured.besa import LearnedSparsity, exact_counts, importance_ranks
from prunekit.models import LoadedModel, adapter_for
from prunekit.models.adapter import weight_matrix

FAST = {"epochs": 1}


def _run(lm, calib, sparsity=0.5, seed=0, **options):
    plan = prunekit.api.plan_prune("besa", sparsity, options={**FAST, **options})
    request = PruneRequest(sparsity=plan.sparsity, seed=seed)
    return plan.make_method().run(lm, calib, request)


def _block_zeros(lm):
    """(zeros, weights) of each block's prunable linears."""
    out = []
    for block in lm.adapter.blocks:
        ws = [weight_matrix(m) for m in lm.adapter.linears(block).values()]
        out.append((sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)))
    return out


@pytest.mark.parametrize(("sparsity", "granularity"), [(0.5, "layer"), (0.6, "row")])
def test_besa_reaches_each_block_target_exactly(stories, stories_calib, sparsity, granularity):
    details = _run(stories, stories_calib[:8, :64], sparsity, granularity=granularity)
    for zeros, total in _block_zeros(stories):
        assert zeros == round(sparsity * total)
    blocks = details["besa"]["blocks"]
    assert len(blocks) == 5
    for facts in blocks:  # the penalty alone already holds the mean within 0.5 points
        assert abs(facts["learned_sparsity"] - sparsity) < 0.005


def test_besa_learns_an_uneven_allocation_reproducibly(stories, stories_calib):
    calib = stories_calib[:8, :64]
    _run(stories, calib, seed=1, epochs=2)
    again = prunekit.load_model("stories260k")
    _run(again, calib, seed=1, epochs=2)
    for a, b in zip(stories.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    ratios = [
        float((weight_matrix(m) == 0).float().mean())
        for block in stories.adapter.blocks
        for m in stories.adapter.linears(block).values()
    ]
    assert max(ratios) - min(ratios) > 0.01  # not uniform: sparsity was moved between layers


def test_besa_through_the_api_records_sparsity_and_refuses_nm(stories):
    record = prunekit.prune(
        stories, "besa", 0.5, calib="tinyshakespeare", nsamples=4, seqlen=64, options=FAST
    )
    assert abs(record.overall_sparsity - 0.5) < 1e-4
    assert len(record.details["besa"]["blocks"]) == 5
    with pytest.raises(prunekit.PrunekitError, match="does not support N:M"):
        prunekit.api.plan_prune("besa", None, "2:4")
    with pytest.raises(prunekit.PrunekitError, match="unknown granularity"):
        prunekit.api.plan_prune("besa", 0.5, options={"granularity": "column"})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_besa_on_tiny_glu_and_conv1d_models(family):
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    _run(lm, ids, 0.4)
    for zeros, total in _block_zeros(lm):
        assert zeros == round(0.4 * total)


def test_exact_counts_sum_to_the_total_within_row_widths():
    wanted = [torch.tensor([3.4, 3.4, 3.4]), torch.tensor([7.9, 0.2])]
    counts = exact_counts(wanted, [4, 8], 15)
    flat = torch.cat(counts)
    assert int(flat.sum()) == 15
    assert (counts[0] <= 4).all() and (counts[1] <= 8).all()
    assert counts[1][0] > counts[1][1]
    capped = exact_counts([torch.tensor([9.0, 1.0])], [5], 8)
    assert capped[0].tolist() == [5, 3]


def test_learned_sparsity_mask_is_hard_forward_with_a_gradient():
    scores = torch.rand(6, 20, generator=torch.Generator().manual_seed(0))
    ratios = torch.arange(0.0, 1.0 - 1e-9, 0.05)
    learner = LearnedSparsity(importance_ranks(scores), ratios, 1, 0.5)
    assert float(learner.sparsity()) == pytest.approx(0.5, abs=0.01)
    mask = learner.mask()
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.detach() == 0, scores <= scores.kthvalue(10, dim=1).values[:, None])
    (mask * scores).sum().backward()
    assert learner.logits.grad is not None and learner.logits.grad.abs().sum() > 0
