"""Magnitude, Wanda, SparseGPT on the real stories260K: exact sparsity, valid N:M,
reconstruction-error ordering on a real layer, and save -> reload with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quick_prune as _prune
from tiny_models import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.engine import SequentialRunner
from prunekit.methods import get_method
from prunekit.methods.unstructured.sparsegpt import sparsegpt_prune
from prunekit.methods.unstructured.wanda import Wanda
from prunekit.models import LoadedModel, adapter_for
from prunekit.models.adapter import weight_matrix
from prunekit.surgery.masks import Pattern, Target, is_valid_nm, make_mask

METHODS = ["magnitude", "wanda", "sparsegpt"]
PATTERNS = ["unstructured", "2:4", "1:4"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_pattern_on_stories(stories, method, pattern, tmp_path):
    record = _prune(stories, method, pattern)
    for block in stories.adapter.blocks:
        for module in stories.adapter.linears(block).values():
            w = weight_matrix(module)
            if pattern == "unstructured" and method == "wanda":  # per row, as the reference
                zeros_per_row = (w == 0).sum(1)
                assert (zeros_per_row == round(w.shape[1] * 0.5)).all()
            elif pattern == "unstructured":  # magnitude and SparseGPT: per layer
                assert int((w == 0).sum()) == pytest.approx(w.numel() * 0.5, abs=w.shape[1])
            else:
                p = Pattern.parse(pattern)
                assert is_valid_nm(w, p.n, p.m)
                assert float((w == 0).float().mean()) == 1 - p.n / p.m
    expected = 0.5 if pattern == "unstructured" else Pattern.parse(pattern).sparsity
    assert record.overall_sparsity == pytest.approx(expected, abs=1e-9)
    assert all(v == pytest.approx(expected, abs=0.01) for v in record.layer_sparsity.values())

    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = stories.model(ids).logits
    out = prunekit.save(stories, tmp_path / "pruned", record)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        after = reloaded(ids).logits
    assert torch.equal(before, after)
    saved = json.loads((out / "prunekit.json").read_text())
    assert saved["method"] == method
    assert saved["request"]["pattern"] == pattern
    assert saved["layer_sparsity"] == record.layer_sparsity
    assert saved["peak_rss_mb"] > 0 and saved["wall_time_s"] > 0
    assert "torch" in saved["versions"]
    if method != "magnitude":
        assert len(saved["calibration"]["source"]["sha256"]) == 64


def test_nm_needs_divisible_inputs_and_says_so_before_pruning(stories):
    before = [p.clone() for p in stories.model.parameters()]
    with pytest.raises(prunekit.PrunekitError, match="divisible by 8"):
        _prune(stories, "wanda", "4:8")
    assert all(torch.equal(a, b) for a, b in zip(before, stories.model.parameters(), strict=True))


def test_layer_scope_is_exact_per_layer(stories):
    _prune(stories, "wanda", "unstructured", sparsity=0.3, scope="layer")
    for block in stories.adapter.blocks:
        for module in stories.adapter.linears(block).values():
            w = weight_matrix(module)
            assert int((w == 0).sum()) == round(w.numel() * 0.3)


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_sparsegpt_exact_per_row_at_odd_ratios(stories, sparsity):
    _prune(
        stories,
        "sparsegpt",
        "unstructured",
        sparsity=sparsity,
        scope="row",
        options={"blocksize": 48},
    )
    for block in stories.adapter.blocks:
        for module in stories.adapter.linears(block).values():
            w = weight_matrix(module)
            assert ((w == 0).sum(1) == round(w.shape[1] * sparsity)).all()


def test_reconstruction_error_ordering_on_a_real_layer(stories, stories_calib):
    """‖WX − ŴX‖: SparseGPT < Wanda < magnitude at 50% on block 1's down_proj."""
    runner = SequentialRunner(stories.adapter, stories_calib, progress=None)
    it = iter(runner)
    next(it)
    ctx = next(it)
    stats = ctx.collect(["input_norm", "hessian"])["mlp.down_proj"]
    captured = {}
    layer = stories.adapter.linear(ctx.block, "down")
    handle = layer.register_forward_hook(lambda m, a, o: captured.update(x=a[0]))
    ctx.forward()
    handle.remove()
    x = captured["x"].reshape(-1, layer.in_features)
    w = layer.weight.data.clone()
    target = Target(0.5)

    def error(pruned):
        return torch.linalg.norm(x @ w.t() - x @ pruned.t()).item()

    wanda_mask = make_mask(Wanda().score(w, stats), target)
    magnitude_mask = make_mask(w.abs(), target)
    sparsegpt, _ = sparsegpt_prune(w, stats["hessian"], target, blocksize=128, percdamp=0.01)
    e_mag, e_wanda, e_sgpt = error(w * magnitude_mask), error(w * wanda_mask), error(sparsegpt)
    assert e_sgpt < e_wanda < e_mag


def test_sparsegpt_raises_damping_when_cholesky_fails():
    w = torch.randn(4, 8)
    h = torch.eye(8)
    h[1, 1] = -5.0  # indefinite: needs more damping
    with pytest.warns(UserWarning, match="Cholesky"):
        pruned, damp = sparsegpt_prune(w, h, Target(0.5), blocksize=8, percdamp=0.01)
    assert damp > 0.01
    assert ((pruned == 0).sum(1) == 4).all()


def test_same_seed_same_result(stories):
    first = prunekit.load_model("stories260k")
    _prune(first, "sparsegpt", "unstructured", seed=3)
    _prune(stories, "sparsegpt", "unstructured", seed=3)
    for a, b in zip(first.model.parameters(), stories.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_ready_plan_runs_like_prune(stories):
    """`run_plan(plan_prune(...))` is what `prune` does: same weights, same record facts."""
    plan = prunekit.api.plan_prune(
        "wanda", 0.5, scope="layer", nsamples=8, calib="tinyshakespeare", propagate="dense"
    )
    assert plan.needs_calibration and (plan.scope, plan.nsamples) == ("layer", 8)
    planned = prunekit.api.run_plan(stories, plan, seqlen=64, seed=2)
    direct = prunekit.load_model("stories260k")
    record = _prune(direct, "wanda", seed=2, scope="layer", propagate="dense")
    for a, b in zip(stories.model.parameters(), direct.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert planned.request == record.request and planned.calibration == record.calibration
    assert not prunekit.api.plan_prune("magnitude", 0.5).needs_calibration
    assert prunekit.api.plan_prune("magnitude", 0.5, allocation="owl").needs_calibration
    assert prunekit.api.plan_prune("magnitude+admm", 0.5).needs_calibration


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_methods_run_on_every_family(family, method):
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    request = prunekit.methods.PruneRequest(sparsity=0.5, pattern=Pattern(2, 4))
    get_method(method)().run(lm, ids, request)
    for block in lm.adapter.blocks:
        for module in lm.adapter.linears(block).values():
            assert is_valid_nm(weight_matrix(module), 2, 4)
            assert float((weight_matrix(module) == 0).float().mean()) == 0.5


def test_dense_propagation_calibrates_on_the_dense_models_activations(stories, stories_calib):
    """propagate="dense": block i's statistics come from the unpruned model's hidden states."""
    with torch.no_grad():
        hidden = stories.model(stories_calib, output_hidden_states=True).hidden_states
        attn_norms = [
            stories.adapter.norm(b, "attn")(hidden[i]).reshape(-1, 64)
            for i, b in enumerate(stories.adapter.blocks)
        ]
    dense_q = [b.self_attn.q_proj.weight.clone() for b in stories.adapter.blocks]
    request = prunekit.methods.PruneRequest(sparsity=0.5, propagate="dense")
    get_method("wanda")().run(stories, stories_calib, request)
    for i, block in enumerate(stories.adapter.blocks):
        norm = attn_norms[i].double().pow(2).sum(0).sqrt().float()
        expected = dense_q[i] * make_mask(dense_q[i].abs() * norm, Target(0.5))
        assert torch.equal(block.self_attn.q_proj.weight, expected)


def _sparsegpt_reference(weight, hessian, target, blocksize=128, percdamp=0.01):
    """SparseGPT's column loop written plainly (one rank-1 update per column), unstructured."""
    from prunekit.methods.unstructured.sparsegpt import (
        _block_mask,
        _block_prune_counts,
        inverse_hessian_factor,
        prepare_hessian,
    )

    w = weight.clone()
    upper, _ = inverse_hessian_factor(prepare_hessian(hessian, w), percdamp)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1, u1 = w[:, i1:i2].clone(), upper[i1:i2, i1:i2]
        d = torch.diag(u1)
        pruned = _block_mask(
            w1.pow(2) / d.pow(2), target, _block_prune_counts(target, w.shape[0], i1, i2)
        )
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            kept = w1[:, i].masked_fill(pruned[:, i], 0)
            err[:, i] = (w1[:, i] - kept) / d[i]
            w1[:, i:] -= err[:, i : i + 1] * u1[i : i + 1, i:]
            w1[:, i] = kept
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ upper[i1:i2, i2:]
    return w


def test_sparsegpt_tiled_sweep_matches_the_plain_column_loop():
    """The tiled sweep is the same algorithm as the textbook one-column-at-a-time loop."""
    torch.manual_seed(0)
    x = torch.randn(2048, 200) @ torch.randn(200, 200)
    hessian = 2 * x.t() @ x / x.shape[0]
    weight = torch.randn(48, 200)
    target = Target(0.5)
    ours, _ = sparsegpt_prune(weight, hessian, target, blocksize=64, percdamp=0.01)
    reference = _sparsegpt_reference(weight, hessian, target, blocksize=64)
    assert torch.equal(ours == 0, reference == 0)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
