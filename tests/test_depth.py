"""Depth pruning: block surgery keeps every family's model exact and loadable; the five
methods give finite, seeded-reproducible scores and remove exactly k blocks."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from tiny_models import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import prunekit
from prunekit.methods import PruneRequest, get_method
from prunekit.methods.depth.base import blocks_to_remove
from prunekit.models import adapter_for
from prunekit.surgery.depth import _update_config, merge_into, mergeable_parameters, remove_blocks

DEPTH_METHODS = [
    ("shortgpt", {}),
    ("angular", {}),
    ("angular", {"tokens": "all"}),
    ("sleb", {"eval_windows": 4}),
    ("shortened_llama", {"eval_windows": 4, "keep_first": 1, "keep_last": 1}),
    (
        "shortened_llama",
        {"criterion": "taylor", "eval_windows": 4, "keep_first": 1, "keep_last": 1},
    ),
    ("laco", {"eval_windows": 4, "merge": 2}),
]


def _ids(n=2, length=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _skipping(adapter, indices):
    """Blocks `indices` of the unchanged model act as the identity (their output = input)."""
    blocks = adapter.blocks
    for i in indices:
        blocks[i].forward = lambda *a, **k: a[0] if a else k["hidden_states"]
    try:
        yield
    finally:
        for i in indices:
            blocks[i].__dict__.pop("forward", None)


def _prune(lm, method, options, calib, sparsity=0.4):
    """Run a depth method on pre-made windows (skips re-tokenizing the calibration text)."""
    cls = get_method(method)
    request = PruneRequest(sparsity=sparsity)
    return cls(cls.Config.from_options(options)).run(lm, calib, request)


@pytest.fixture(scope="module")
def calib(stories_calib):
    """4 calibration windows of 40 tokens for stories260K: [4, 40]."""
    return stories_calib[:4, :40]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_removed_blocks_equal_skipping_them(family):
    """Physically removing block 1 gives the logits of the original with block 1 skipped
    (sequence longer than gemma's sliding window, so per-layer masks matter)."""
    original = tiny_model(family)
    pruned = tiny_model(family)
    ids = _ids()
    with torch.no_grad(), _skipping(adapter_for(original), [1]):
        expected = original(ids, use_cache=False).logits
    kept = remove_blocks(adapter_for(pruned), [1])
    assert kept == [0, 2]
    assert pruned.config.num_hidden_layers == 2
    with torch.no_grad():
        got = pruned(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen2", "llama", "gpt2", "opt"])
def test_kv_cache_generation_after_removal(family):
    """Cached greedy decoding equals uncached decoding after removal, and the cache holds
    one layer per remaining block (layer_idx re-indexed)."""
    model = tiny_model(family)
    remove_blocks(adapter_for(model), [0])
    ids = _ids(1, 20)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
        out = model(ids, use_cache=True)
    assert torch.equal(cached, uncached)
    assert len(out.past_key_values.layers) == 2
    layer_idx = [
        m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
    ]
    assert sorted(set(layer_idx)) == [0, 1]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_layer_types_follow_the_kept_blocks(family, tmp_path):
    model = tiny_model(family)
    before = list(model.config.layer_types)
    remove_blocks(adapter_for(model), [1])
    assert model.config.layer_types == [before[0], before[2]]
    assert [b.self_attn.layer_type for b in model.model.layers] == model.config.layer_types
    ids = _ids(2, 24)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["layer_types"] == model.config.layer_types
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_per_layer_overrides_are_rekeyed():
    config = LlamaConfig(num_hidden_layers=4, per_layer_config={2: {"intermediate_size": 48}})
    _update_config(config, kept=[0, 2, 3], num_blocks=4)
    assert config.num_hidden_layers == 3
    assert config._heterogeneity_spec.per_layer_overrides == {1: {"intermediate_size": 48}}


def test_bad_block_indices_are_named():
    adapter = adapter_for(tiny_model("llama"))
    with pytest.raises(prunekit.PrunekitError, match=r"\[3\] out of range; valid: 0..2"):
        remove_blocks(adapter, [3])
    with pytest.raises(prunekit.PrunekitError, match="at least one must remain"):
        remove_blocks(adapter, [0, 1, 2])
    with pytest.raises(prunekit.PrunekitError, match="leaves none"):
        blocks_to_remove(0.0, 3, 3)
    assert adapter.num_layers == 3


def test_merge_adds_parameter_differences():
    adapter = adapter_for(tiny_model("llama"))
    params = [
        {n: p.detach().clone() for n, p in mergeable_parameters(adapter, b).items()}
        for b in adapter.blocks
    ]
    norm_before = adapter.blocks[0].input_layernorm.weight.detach().clone()
    merge_into(adapter, 0, [1, 2])
    for name, p in mergeable_parameters(adapter, adapter.blocks[0]).items():
        expected = (
            params[0][name]
            + (params[1][name] - params[0][name])
            + (params[2][name] - params[0][name])
        )
        torch.testing.assert_close(p.detach(), expected)
    assert torch.equal(adapter.blocks[0].input_layernorm.weight, norm_before)


@pytest.mark.parametrize(("method", "options"), DEPTH_METHODS)
def test_depth_methods_on_stories(method, options, calib):
    """k = round(0.4 × 5) = 2 blocks go; scores are finite (None for blocks a method never
    scores: SLEB's and Shortened LLaMA's protected ends, LaCo's last two start positions)
    and the same on a second run."""
    first = prunekit.load_model("stories260k")
    details = _prune(first, method, options, calib)
    again = _prune(prunekit.load_model("stories260k"), method, options, calib)
    assert details == again
    assert details["num_blocks_before"] == 5 and details["num_blocks_after"] == 3
    assert len(details["removed_blocks"]) == 2
    assert sorted(details["removed_blocks"] + details["kept_blocks"]) == list(range(5))
    assert first.adapter.num_layers == 3
    scored = [s for s in details["block_scores"] if s is not None]
    assert len(scored) >= 3
    assert all(math.isfinite(s) for s in scored)


def test_seeded_prune_saves_and_reloads_identically(tmp_path):
    """Through the API: same seed, same windows and scores; another seed, other scores;
    the saved folder reloads in plain transformers with identical logits and records
    the removed indices and every block's score."""
    kw = dict(sparsity=0.4, calib="tinystories", nsamples=4, seqlen=32)
    first = prunekit.load_model("stories260k")
    record = prunekit.prune(first, "laco", seed=3, options={"merge": 2}, **kw)
    same = prunekit.prune(
        prunekit.load_model("stories260k"), "laco", seed=3, options={"merge": 2}, **kw
    )
    other = prunekit.prune(
        prunekit.load_model("stories260k"), "laco", seed=4, options={"merge": 2}, **kw
    )
    assert record.details == same.details
    assert record.details["block_scores"] != other.details["block_scores"]
    assert record.parameters_after < record.parameters_before

    ids = _ids(2, 32, vocab=512)
    with torch.no_grad():
        before = first.model(ids).logits
    out = prunekit.save(first, tmp_path / "pruned", record)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)
    saved = json.loads((out / "prunekit.json").read_text())
    assert saved["method"] == "laco"
    assert saved["details"]["removed_blocks"] == record.details["removed_blocks"]
    assert saved["details"]["block_scores"] == record.details["block_scores"]
    assert saved["details"]["merges"] == record.details["merges"]


def test_removal_follows_the_scores(stories, calib):
    """ShortGPT removes the lowest-influence blocks; the angular run is the argmin run;
    SLEB's first removal is the block whose removal gave the lowest calibration PPL."""
    shortgpt = _prune(stories, "shortgpt", {}, calib)
    scores = shortgpt["block_scores"]
    assert shortgpt["removed_blocks"] == sorted(sorted(range(5), key=scores.__getitem__)[:2])

    angular = _prune(prunekit.load_model("stories260k"), "angular", {}, calib)
    runs = angular["run_distances"]
    start = runs.index(min(runs))
    assert angular["removed_blocks"] == [start, start + 1]

    pruned = prunekit.load_model("stories260k")
    sleb = _prune(pruned, "sleb", {"eval_windows": 3}, calib)
    first_ppl = sleb["block_scores"]
    assert first_ppl[0] is None and first_ppl[-1] is None  # the protected ends
    scored = {i: s for i, s in enumerate(first_ppl) if s is not None}
    assert sleb["removal_order"][0] == min(scored, key=scored.__getitem__)
    # the perplexity SLEB computed on its block path is the pruned model's own
    windows = calib[:3]
    with torch.no_grad():
        loss = pruned.model(windows, labels=windows).loss
    assert math.exp(loss) == pytest.approx(sleb["greedy_steps"][-1]["calib_ppl"], rel=1e-4)


def test_blocks_option_sets_the_recorded_sparsity(stories):
    """`blocks=K` removes K blocks and the record says K / depth, never a default ratio;
    giving a sparsity as well is refused before anything loads."""
    record = prunekit.prune(
        stories, "shortgpt", options={"blocks": 1}, calib="tinyshakespeare", nsamples=2, seqlen=32
    )
    assert len(record.details["removed_blocks"]) == 1
    assert stories.adapter.num_layers == 4
    assert record.request["sparsity"] == pytest.approx(1 / 5)
    assert record.outcome.startswith("removed 1 of 5 blocks (20.0% of the depth)")
    with pytest.raises(prunekit.PrunekitError, match="not both"):
        prunekit.api.plan_prune("shortgpt", 0.2, options={"blocks": 2})


def test_depth_methods_refuse_a_non_uniform_allocation():
    with pytest.raises(prunekit.PrunekitError, match="depth methods remove whole blocks"):
        prunekit.api.plan_prune("shortgpt", 0.2, allocation="owl")


@pytest.mark.parametrize("criterion", ["ppl", "taylor"])
def test_shortened_llama_keeps_the_ends_with_either_criterion(calib, criterion):
    """The reference filters keep-first / keep-last for both criteria: with 2 + 2 protected
    of 5 blocks only block 2 may go, and the default 4 + 2 leaves no candidate."""
    options = {"criterion": criterion, "eval_windows": 2, "keep_first": 2, "keep_last": 2}
    lm = prunekit.load_model("stories260k")
    details = _prune(lm, "shortened_llama", options, calib, sparsity=0.2)
    assert details["removed_blocks"] == [2]
    with pytest.raises(prunekit.PrunekitError, match="leaving 0 candidates"):
        _prune(prunekit.load_model("stories260k"), "shortened_llama", {}, calib)


def test_sleb_never_removes_the_first_or_last_block(calib):
    """SLEB's early_barrier = latter_barrier = 1: even removing 3 of 5 blocks keeps 0 and 4;
    with the barriers off the independent greedy search below gives the same first pick
    as prunekit among all blocks."""
    details = _prune(prunekit.load_model("stories260k"), "sleb", {"eval_windows": 2}, calib, 0.6)
    assert details["removed_blocks"] == [1, 2, 3]
    with pytest.raises(prunekit.PrunekitError, match="leaving 3 candidates for 4"):
        _prune(prunekit.load_model("stories260k"), "sleb", {"eval_windows": 2}, calib, 0.8)
    free = {"eval_windows": 2, "protect_first": 0, "protect_last": 0}
    details = _prune(prunekit.load_model("stories260k"), "sleb", free, calib, 0.2)
    windows = calib[:2]
    nlls = []
    for block in range(5):
        lm = prunekit.load_model("stories260k")
        del lm.model.model.layers[block]
        lm.model.config.num_hidden_layers = 4
        for i, layer in enumerate(lm.model.model.layers):
            layer.self_attn.layer_idx = i
        with torch.no_grad():
            nlls.append(float(lm.model(windows, labels=windows, use_cache=False).loss))
    assert details["removed_blocks"] == [min(range(5), key=nlls.__getitem__)]


def test_laco_never_merges_the_final_block(calib):
    """The reference scans from the block below the top: with merge=2 and a threshold no
    merge can reach, the final scan still stops below the final block."""
    options = {"eval_windows": 2, "merge": 2, "threshold": 0.999}
    details = _prune(prunekit.load_model("stories260k"), "laco", options, calib, 0.4)
    for merge in details["merges"]:
        assert 4 not in merge["blocks"]
    assert 4 in details["kept_blocks"]


def test_taylor_plus_keeps_the_ends(stories, calib):
    options = {"criterion": "taylor", "eval_windows": 2, "keep_first": 2, "keep_last": 2}
    details = _prune(stories, "shortened_llama", options, calib, sparsity=0.2)
    assert details["removed_blocks"] == [2]  # the only block not protected
    with pytest.raises(prunekit.PrunekitError, match="leaving 0 candidates"):
        _prune(
            prunekit.load_model("stories260k"), "shortened_llama", {"criterion": "taylor"}, calib
        )


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("angular", {"tokens": "middle"}, "unknown tokens mode 'middle'; valid: last, all"),
        ("shortened_llama", {"criterion": "grad"}, "unknown criterion 'grad'; valid: ppl, taylor"),
        ("laco", {"merge": 1}, "merge must be >= 2"),
        ("shortgpt", {"blocks": 5}, "removing 5 of 5 blocks leaves none"),
    ],
)
def test_bad_options_fail_before_changing_the_model(stories, calib, method, options, message):
    before = [p.clone() for p in stories.model.parameters()]
    with pytest.raises(prunekit.PrunekitError, match=message):
        _prune(stories, method, options, calib)
    after = list(stories.model.parameters())
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
