"""Early exit (AdaInfer): the classifier learns to stop when deeper blocks change
nothing, its decisions match between scoring and generation, and a policy that never
stops reproduces the full model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import prunekit
from prunekit.inference import early_exit


def _make_last_blocks_identity(lm, first_identity: int) -> None:
    """Zero the output projections of blocks ≥ `first_identity`: they add nothing to the
    residual stream, so every later layer predicts exactly what the last one does."""
    adapter = lm.adapter
    for block in list(adapter.blocks)[first_identity:]:
        for role in ("o", "down"):
            adapter.linear(block, role).weight.data.zero_()


@pytest.fixture(scope="module")
def easy():
    """stories260K whose blocks 2..4 are the identity, and a policy fitted on it."""
    lm = prunekit.load_model("stories260k")
    _make_last_blocks_identity(lm, 2)
    from prunekit.data import calibration_windows, load_text

    text = load_text("tinyshakespeare", purpose="calib").text
    windows = calibration_windows(lm.tokenizer, text, nsamples=10, seqlen=64, seed=0)
    return lm, early_exit.fit(lm, windows[:6]), windows[6:]


def test_classifier_cuts_layers_on_an_easy_case(easy):
    lm, policy, held_out = easy
    result = policy.score(lm, held_out)
    assert result["mean_blocks_used"] < 4.0  # of 5: most inputs stop at block 2
    assert result["agreement_with_full"] > 0.95
    assert result["positions"] == held_out.numel() - held_out.shape[0]
    assert policy.training["positive_share"] > 0.5
    # a stricter threshold never uses fewer blocks
    strict = dataclasses.replace(policy, threshold=0.99).score(lm, held_out)
    assert strict["mean_blocks_used"] >= result["mean_blocks_used"]


def test_generation_stops_where_scoring_says(easy):
    """forward_exit runs blocks only up to the exit the scorer computes for that input."""
    lm, policy, held_out = easy
    ids = held_out[0, :30]
    view = early_exit.layer_view(lm, ids)
    expected_exit = int(policy.exit_blocks(view.features)[-1])
    logits, used = policy.forward_exit(lm, ids.unsqueeze(0))
    assert used == expected_exit + 1
    assert int(logits.argmax()) == int(view.top1[expected_exit, -1])
    out, steps = policy.generate(lm, ids.unsqueeze(0), max_new_tokens=4)
    assert out.shape == (1, 34) and len(steps) == 4
    assert all(1 <= s <= 5 for s in steps)


def test_a_policy_that_never_stops_is_the_full_model(stories):
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    never = early_exit.EarlyExitPolicy(
        weight=[0.0, 0.0], bias=-50.0, mean=[0.0, 0.0], std=[1.0, 1.0], threshold=0.5, num_blocks=5
    )
    logits, used = never.forward_exit(stories, ids)
    assert used == 5
    with torch.no_grad():
        full = stories.model(ids).logits[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    result = never.score(stories, ids)
    assert result["mean_blocks_used"] == 5
    assert result["agreement_with_full"] == 1.0
    assert result["nll"] == pytest.approx(result["full_nll"])


def test_policy_round_trips_and_checks_the_model(easy, tmp_path):
    lm, policy, _ = easy
    loaded = early_exit.EarlyExitPolicy.load(policy.save(tmp_path / "policy.json"))
    assert loaded == policy
    shallow = prunekit.load_model("stories260k")
    from prunekit.surgery.depth import remove_blocks

    remove_blocks(shallow.adapter, [4])
    with pytest.raises(prunekit.PrunekitError, match="trained on 5 blocks; the model has 4"):
        policy.score(shallow, torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(prunekit.PrunekitError, match=r"threshold must be in \(0, 1\)"):
        early_exit.fit(lm, torch.zeros(1, 8, dtype=torch.long), threshold=1.0)


def _constant_policy(bias: float) -> early_exit.EarlyExitPolicy:
    """A policy that always (bias > 0) or never (bias < 0) stops, for stories260K."""
    return early_exit.EarlyExitPolicy(
        weight=[0.0, 0.0], bias=bias, mean=[0.0, 0.0], std=[1.0, 1.0], threshold=0.5, num_blocks=5
    )


def test_exit_logits_score_zero_shot_requests_at_the_exit_block(stories):
    """Zero-shot scoring through a policy: stopping after block 0 everywhere scores like the
    model cut to its first block; never stopping scores like the full model."""
    from prunekit.eval.loglik import loglikelihoods
    from prunekit.surgery.depth import remove_blocks

    requests = [("Once upon a time there", " was a girl"), ("The cat sat", " on the mat")]

    def scores(model) -> list[float]:
        found = loglikelihoods(model, stories.tokenizer, requests, batch_size=1, desc=None)
        return [s.logprob for s in found]

    never = early_exit.ExitLogits(stories, _constant_policy(-50.0))
    assert scores(never) == pytest.approx(scores(stories.model), abs=1e-5)
    assert never.blocks_used == 5 * never.positions

    always = early_exit.ExitLogits(stories, _constant_policy(50.0))
    exited = scores(always)
    assert always.blocks_used == always.positions
    first_block_only = prunekit.load_model("stories260k")
    remove_blocks(first_block_only.adapter, [1, 2, 3, 4])
    assert exited == pytest.approx(scores(first_block_only.model), abs=1e-4)
    assert exited != pytest.approx(scores(stories.model), abs=1e-2)
