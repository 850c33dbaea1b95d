"""The weight-update axis (ADMM, ALPS, SparseGPT's OBS update after any mask), gradual
ADMM and the ALPS method: masks kept exactly, exact sparsity and valid N:M, and the
layer reconstruction-error orderings on a real stories260K layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import quick_prune as _prune
from helpers import run_cli
from tiny_models import tiny_model

import prunekit
import prunekit.api
from prunekit.engine import SequentialRunner
from prunekit.methods import PruneRequest, get_method
from prunekit.methods.unstructured.admm_gradual import cubic_sparsity, relaxed_mask
from prunekit.methods.unstructured.updates import get_update
from prunekit.methods.unstructured.updates.admm_core import LayerProblem, pcg_on_support
from prunekit.methods.unstructured.wanda import Wanda
from prunekit.models import LoadedModel, adapter_for
from prunekit.models.adapter import weight_matrix
from prunekit.surgery.masks import Pattern, Target, is_valid_nm, make_mask

FAST_ALPS = {"max_iterations": 12, "min_iterations": 6, "cg_iterations": 10}
FAST_GRADUAL = {"iterations": 6, "ramp": 4}


def _run(lm, spec, calib, pattern="unstructured", sparsity=0.5, scope="row", **kw):
    """Run a method (or "method+update") straight on calibration windows [n, L]."""
    sparsity = sparsity if pattern == "unstructured" else None
    plan = prunekit.api.plan_prune(spec, sparsity, pattern, scope, **kw)
    request = PruneRequest(sparsity=plan.sparsity, pattern=plan.pattern, scope=scope)
    return plan.make_method().run(lm, calib, request)


def _weights(lm):
    return [
        weight_matrix(m) for block in lm.adapter.blocks for m in lm.adapter.linears(block).values()
    ]


def _assert_target(lm, pattern, sparsity=0.5, scope="row"):
    for w in _weights(lm):
        if pattern == "unstructured" and scope == "layer":
            assert int((w == 0).sum()) == round(w.numel() * sparsity)
        elif pattern == "unstructured":
            assert ((w == 0).sum(1) == round(w.shape[1] * sparsity)).all()
        else:
            p = Pattern.parse(pattern)
            assert is_valid_nm(w, p.n, p.m)
            assert float((w == 0).float().mean()) == p.sparsity


@pytest.fixture(scope="module")
def real_layer():
    """Block 1's down_proj of stories260K: weight [64, 172], its stats and inputs X."""
    lm = prunekit.load_model("stories260k")
    from prunekit.data import calibration_windows, load_text

    text = load_text("tinyshakespeare", purpose="calib").text
    calib = calibration_windows(lm.tokenizer, text, nsamples=16, seqlen=128, seed=0)
    it = iter(SequentialRunner(lm.adapter, calib, progress=None))
    next(it)
    ctx = next(it)
    layer = lm.adapter.linear(ctx.block, "down")
    stats = ctx.collect(["input_norm", "hessian"], {"down": layer})["down"]
    captured = {}
    handle = layer.register_forward_hook(lambda m, a, o: captured.update(x=a[0]))
    ctx.forward()
    handle.remove()
    x = captured["x"].reshape(-1, layer.in_features)
    return copy.deepcopy(layer), stats, x


def _error(x, dense, pruned):
    return torch.linalg.norm(x @ dense.t() - x @ pruned.t()).item()


@pytest.mark.parametrize("update", ["admm", "alps", "sparsegpt"])
@pytest.mark.parametrize("target", [Target(0.5), Target(0.5, Pattern(2, 4)), Target(0.7)])
def test_update_never_revives_a_pruned_weight(real_layer, update, target):
    layer, stats, x = real_layer
    layer = copy.deepcopy(layer)
    dense = layer.weight.data.clone()
    mask = make_mask(Wanda().score(dense, stats), target)
    layer.weight.data.mul_(mask)
    facts = get_update(update)().apply(layer, dense, stats)
    new = layer.weight.data
    assert torch.equal(new != 0, mask)  # same zeros: nothing revived, nothing extra pruned
    assert facts["after"] < facts["before"]
    assert _error(x, dense, new) < _error(x, dense, dense * mask)


@pytest.mark.parametrize("target", [Target(0.5), Target(0.5, Pattern(2, 4))])
def test_admm_beats_sparsegpt_update_for_the_same_mask_and_alps_beats_admm(real_layer, target):
    """‖WX − ŴX‖ on a real layer, Wanda's mask: ALPS ≤ ADMM < SparseGPT's OBS < no update."""
    layer, stats, x = real_layer
    dense = layer.weight.data.clone()
    mask = make_mask(Wanda().score(dense, stats), target)
    errors = {
        name: _error(x, dense, get_update(name)().solve(dense, mask, stats) * mask)
        for name in ("sparsegpt", "admm", "alps")
    }
    errors["none"] = _error(x, dense, dense * mask)
    assert errors["alps"] <= errors["admm"] < errors["sparsegpt"] < errors["none"]


def test_more_admm_iterations_approach_the_least_squares_solution_on_the_mask(real_layer):
    """ADMM converges to the damped least-squares optimum on the support, which PCG finds."""
    layer, stats, _ = real_layer
    dense = layer.weight.data.clone()
    mask = make_mask(Wanda().score(dense, stats), Target(0.5))
    problem = LayerProblem.build(dense, stats["hessian"], 0.1)
    exact, _ = pcg_on_support(problem, mask, problem.dense * mask, 500, tolerance=1e-7)
    admm = get_update("admm")
    distances = []
    for iterations in (2, 10, 50):
        new = admm(admm.Config(iterations=iterations)).solve(dense, mask, stats)
        normalised = new * problem.scale.unsqueeze(0)
        distances.append(float((normalised - exact).norm() / exact.norm()))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 1e-2


def test_cubic_schedule_and_relaxed_masks_end_at_the_target():
    assert cubic_sparsity(0.6, 0, 1) == pytest.approx(0.6)
    steps = [cubic_sparsity(0.6, t, 15) for t in range(15)]
    assert steps == sorted(steps) and steps[-1] == pytest.approx(0.6) and steps[0] < 0.15
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    target = Target(0.5, Pattern(2, 4))
    final = make_mask(scores, target)
    partial = relaxed_mask(scores, target, 0.25)
    assert (partial | ~final).all()  # contains the final mask
    assert ((~partial).sum(1) == 4).all()
    assert torch.equal(relaxed_mask(scores, target, 0.5), final)


@pytest.mark.parametrize(
    ("pattern", "sparsity", "scope"),
    [("unstructured", 0.4, "layer"), ("2:4", None, "row")],
)
def test_admm_gradual_ends_exactly_at_the_target(stories, stories_calib, pattern, sparsity, scope):
    calib = stories_calib[:4, :64]
    _run(stories, "admm_gradual", calib, pattern, sparsity, scope, options=FAST_GRADUAL)
    if scope == "layer":
        for w in _weights(stories):
            assert int((w == 0).sum()) == round(w.numel() * sparsity)
    else:
        _assert_target(stories, pattern, sparsity or 0.5)


def test_alps_method_gives_exact_nm_on_stories(stories, stories_calib):
    details = _run(stories, "alps", stories_calib[:4, :64], "2:4", options=FAST_ALPS)
    _assert_target(stories, "2:4")
    assert 6 <= details["alps"]["mean_admm_iterations"] <= 12


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_method_beats_sparsegpt_on_a_real_layer(real_layer, pattern):
    layer, stats, x = real_layer
    target = Target(0.5, Pattern.parse(pattern))
    errors = {}
    for name in ("sparsegpt", "alps"):
        pruned = copy.deepcopy(layer)
        get_method(name)().prune_linear(pruned, stats, target, "down")  # default options
        errors[name] = _error(x, layer.weight.data, pruned.weight.data)
    assert errors["alps"] < errors["sparsegpt"]


@pytest.mark.parametrize(
    ("method", "update", "pattern"),
    [("magnitude", "admm", "unstructured"), ("sparsegpt", "alps", "2:4")],
)
def test_update_after_any_mask_method_keeps_sparsity_and_records_it(
    stories, method, update, pattern, tmp_path
):
    options = {"iterations": 3} | ({"pcg_iterations": 10} if update == "alps" else {})
    record = _prune(stories, method, pattern, update=update, update_options=options)
    _assert_target(stories, pattern, scope=get_method(method).default_scope)
    assert record.method == method
    assert record.request["update"] == update
    assert record.update == {"name": update, "config": record.update["config"]}
    assert record.update["config"]["iterations"] == 3
    assert record.calibration is not None  # magnitude is data-free, its update is not
    facts = record.details["update"]
    assert facts["layers"] == 35
    assert facts["mean_relative_error_after"] < facts["mean_relative_error_before"]
    saved = json.loads(
        (prunekit.save(stories, tmp_path / "m", record) / "prunekit.json").read_text()
    )
    assert saved["update"]["name"] == update


@pytest.mark.parametrize(("update", "pattern"), [("admm", "2:4")])
def test_wanda_plus_update_keeps_the_pattern_and_lowers_every_layer_error(
    stories, stories_calib, update, pattern
):
    options = {"iterations": 3} | ({"pcg_iterations": 10} if update == "alps" else {})
    calib = stories_calib[:4, :64]
    details = _run(stories, f"wanda+{update}", calib, pattern, update_options=options)
    _assert_target(stories, pattern)
    facts = details["update"]
    assert facts["name"] == update and facts["layers"] == 35
    assert facts["mean_relative_error_after"] < facts["mean_relative_error_before"]


def test_plus_shorthand_is_the_same_as_the_update_option():
    a = prunekit.api.plan_prune("wanda+admm", 0.5, update_options={"iterations": 3})
    b = prunekit.api.plan_prune("wanda", 0.5, update="admm", update_options={"iterations": 3})
    assert a.method is b.method is get_method("wanda")
    assert (
        a.update.describe()
        == b.update.describe()
        == {
            "name": "admm",
            "config": {"iterations": 3, "rho": 1.0, "damp": 0.1},
        }
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update": "nope"}, "unknown update 'nope'; valid: none, admm, alps, sparsegpt"),
        ({"update_options": {"iterations": 3}}, "no update requested"),
        ({"update": "admm", "update_options": {"iterations": 0}}, "at least 1"),
        ({"update": "admm", "update_options": {"bogus": 1}}, "unknown option 'bogus'"),
        ({"method": "wanda+admm", "update": "alps"}, "names update 'admm'"),
    ],
)
def test_bad_update_requests_fail_with_one_clear_line(kwargs, message):
    kwargs = {"method": "wanda", **kwargs}
    with pytest.raises(prunekit.PrunekitError, match=message):
        prunekit.api.plan_prune(kwargs.pop("method"), 0.5, **kwargs)


def test_data_free_run_refuses_an_update(stories):
    method = get_method("magnitude")(update=get_update("admm")())
    with pytest.raises(prunekit.PrunekitError, match="needs calibration data"):
        method.run(stories, None, PruneRequest(sparsity=0.5))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["wanda+admm", "alps", "admm_gradual"])
def test_runs_on_tiny_glu_and_non_glu_models(family, method):
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    options = {"alps": FAST_ALPS, "admm_gradual": FAST_GRADUAL}.get(method, {})
    plan = prunekit.api.plan_prune(method, None, "2:4", options=options)
    plan.make_method().run(lm, ids, PruneRequest(sparsity=0.5, pattern=Pattern(2, 4)))
    for w in _weights(lm):
        assert is_valid_nm(w, 2, 4)
        assert float((w == 0).float().mean()) == 0.5


def test_cli_update_option(tmp_path):
    args = ["prune", "stories260k", "--calib", "tinyshakespeare", "--nsamples", "4"]
    args += ["--seqlen", "64", "--method", "wanda", "--update", "admm"]
    args += ["--update-opt", "iterations=3", "--json", "run.json"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["update"] == {
        "name": "admm",
        "config": {"iterations": 3, "rho": 1.0, "damp": 0.1},
    }


@pytest.mark.parametrize("method", ["admm_gradual", "alps"])
def test_dead_inputs_never_win_kept_slots(method):
    """16 of 64 inputs are never active (H_jj = 0). Their weights cannot change the layer's
    output, so every kept slot must go to a live input, as the references' √H_jj + ε
    normalisation makes it; the live inputs' kept count is exactly 32 per row."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen) * 0.01  # live inputs: √H_jj = 0.16 < 1
    x[:, 48:] = 0
    layer = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 64, generator=gen) * 3)
    cls = get_method(method)
    cls().prune_linear(layer, {"hessian": (x.t() @ x).double()}, Target(0.5), "layer")
    w = layer.weight.detach()
    assert int((w[:, 48:] != 0).sum()) == 0
    assert ((w != 0).sum(1) == 32).all()
