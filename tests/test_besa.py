"""BESA against its reference (OpenGVLab/LLMPrune-BESA `SparseLinear` and `main.py`):
the candidate ratios, keep probabilities and hard masks, the per-channel normalised loss,
written again here; runs on stories260K and tiny GLU / non-GLU (GPT-2 Conv1D) models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import prunekit
import prunekit.api
from prunekit.methods import PruneRequest
from prunekit.methods.unstructured.besa import (
    LearnedSparsity,
    candidate_ratios,
    channel_normalised_error,
    exact_counts,
    importance_ranks,
)
from prunekit.models import LoadedModel, adapter_for
from prunekit.models.adapter import weight_matrix


def _run(lm, calib, sparsity=0.5, seed=0, **options):
    plan = prunekit.api.plan_prune("besa", sparsity, options=options)
    request = PruneRequest(sparsity=plan.sparsity, seed=seed)
    return plan.make_method().run(lm, calib, request)


def _block_zeros(lm):
    """(zeros, weights) of each block's prunable linears."""
    out = []
    for block in lm.adapter.blocks:
        ws = [weight_matrix(m) for m in lm.adapter.linears(block).values()]
        out.append((sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)))
    return out


# -- the reference's formulas, written again -------------------------------------------


def reference_keep_probability(metric, logits, step, smooth=True):
    """`SparseLinear.get_prob_mask` for one learnable row each (blocksize 1, wise_dim row)."""
    rows, cols = metric.shape
    candidates = torch.arange(1.0, -1 * step, -1 * step)
    candidates[-1] = 0.0
    prob_map = torch.zeros((len(candidates), cols))
    for i in range(len(candidates)):
        prob_map[i, : int(cols * candidates[i].item())] = 1
    beta = (logits.sigmoid() if smooth else logits).softmax(dim=-1)
    probabilities = 1 - (beta @ prob_map)  # [rows, cols] in sorted order
    sort_indices = torch.sort(metric, dim=-1, stable=True)[1]
    keep = torch.zeros((rows, cols))
    keep.scatter_(1, sort_indices, probabilities)
    sparsities = beta @ candidates
    hard = torch.ones((rows, cols))
    prune_num = (sparsities * cols).to(dtype=torch.long)
    for r in range(rows):
        hard[r, sort_indices[r, : prune_num[r]]] = 0
    return keep, hard, sparsities


def test_keep_probabilities_and_hard_mask_equal_the_reference():
    gen = torch.Generator().manual_seed(0)
    metric = torch.rand(6, 40, generator=gen)
    learner = LearnedSparsity(importance_ranks(metric), candidate_ratios(0.05), 6, True)
    with torch.no_grad():
        learner.logits.copy_(torch.randn(6, 21, generator=gen) * 3)
    # the reference orders candidates 1 .. 0; ours 0 .. 1: the same logits, reversed
    keep, hard, sparsities = reference_keep_probability(metric, learner.logits.flip(-1), 0.05)
    torch.testing.assert_close(learner.sparsity().detach(), sparsities)
    torch.testing.assert_close(learner.keep_probability().detach(), keep)
    torch.testing.assert_close(learner.mask().detach(), hard)  # hard + p − p (float noise)
    (learner.mask() * metric).sum().backward()
    assert learner.logits.grad is not None and learner.logits.grad.abs().sum() > 0


def test_uniform_start_is_half_sparse():
    learner = LearnedSparsity(importance_ranks(torch.rand(3, 10)), candidate_ratios(0.01), 3, True)
    assert learner.sparsity().detach().tolist() == pytest.approx([0.5] * 3)


def test_loss_is_the_references_channel_normalised_error():
    gen = torch.Generator().manual_seed(1)
    refer, pruned = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    l2_scaler = torch.norm(refer.reshape((-1, refer.shape[-1])).t(), p=2, dim=1)
    expected = (((refer - pruned) / l2_scaler) ** 2).sum() / refer.shape[-1]
    torch.testing.assert_close(channel_normalised_error(pruned, refer), expected)


# -- runs ----------------------------------------------------------------------------------


def test_besa_default_learns_per_row_sparsity_near_the_target(stories, stories_calib):
    details = _run(stories, stories_calib[:8, :64], 0.5)
    blocks = details["besa"]["blocks"]
    assert len(blocks) == 5
    for facts in blocks:  # the penalty pulls every block to its target
        assert abs(facts["learned_sparsity"] - 0.5) < 0.05
    zeros = [z / n for z, n in _block_zeros(stories)]
    assert all(abs(z - 0.5) < 0.05 for z in zeros)
    rows = [float(r) for m in stories.adapter.linears(stories.adapter.blocks[2]).values()
            for r in (weight_matrix(m) == 0).float().mean(1)]  # fmt: skip
    assert max(rows) - min(rows) > 0.01  # rows learned different sparsities


@pytest.mark.parametrize(("sparsity", "granularity"), [(0.5, "layer"), (0.6, "row")])
def test_besa_exact_reaches_each_block_target_exactly(
    stories, stories_calib, sparsity, granularity
):
    _run(stories, stories_calib[:8, :64], sparsity, granularity=granularity, exact=True)
    for zeros, total in _block_zeros(stories):
        assert zeros == round(sparsity * total)


def test_besa_is_deterministic(stories, stories_calib):
    calib = stories_calib[:4, :64]
    _run(stories, calib, optimizer="adam", lr=0.05)
    again = prunekit.load_model("stories260k")
    _run(again, calib, optimizer="adam", lr=0.05)
    for a, b in zip(stories.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_besa_through_the_api_records_sparsity_and_refuses_nm(stories):
    record = prunekit.prune(
        stories, "besa", 0.5, calib="tinyshakespeare", nsamples=4, seqlen=64,
        options={"exact": True},
    )  # fmt: skip
    assert abs(record.overall_sparsity - 0.5) < 1e-4
    assert len(record.details["besa"]["blocks"]) == 5
    with pytest.raises(prunekit.PrunekitError, match="does not support N:M"):
        prunekit.api.plan_prune("besa", None, "2:4")
    with pytest.raises(prunekit.PrunekitError, match="unknown granularity"):
        prunekit.api.plan_prune("besa", 0.5, options={"granularity": "column"})
    with pytest.raises(prunekit.PrunekitError, match="unknown optimizer"):
        prunekit.api.plan_prune("besa", 0.5, options={"optimizer": "sgd"})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_besa_on_tiny_glu_and_conv1d_models(family):
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    _run(lm, ids, 0.4, exact=True)
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
