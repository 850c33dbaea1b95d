"""SliceGPT: exact equivalence of the rotated (unsliced) model, graceful degradation when
sliced, sliced shapes, save -> reload (prunekit and plain transformers) with identical
logits, and clear errors for families whose norms are not rotation-invariant."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import prunekit
from prunekit import settings
from prunekit.data import load_text
from prunekit.export.folder import save_pruned
from prunekit.methods import PruneRequest, get_method
from prunekit.methods.width.slicegpt import sliced_parameters, sliced_width, width_for_parameters
from prunekit.models import LoadedModel, adapter_for
from prunekit.models.sliced_modeling import ShortcutDecoderLayer
from prunekit.surgery.width import decoder_parameters

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    """20k characters of Tiny Shakespeare (tokenizing the whole file is slow)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(load_text("tinyshakespeare", purpose="calib").text[:20000])
    return str(path)


def _slice(lm, calib, sparsity, **options):
    return prunekit.prune(
        lm,
        "slicegpt",
        sparsity=sparsity,
        calib=calib,
        nsamples=4,
        seqlen=64,
        options=options,
    )


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_rotation_without_slicing_keeps_stories_logits(stories, calib_file):
    before = _logits(stories.model)
    record = _slice(stories, calib_file, 0.0)
    after = _logits(stories.model)
    assert (after - before).abs().max() < 1e-4
    assert record.details["sliced_hidden_size"] == 64
    assert all(isinstance(b, ShortcutDecoderLayer) for b in stories.adapter.blocks)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_rotation_without_slicing_keeps_tiny_model_logits(family):
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))
    before = _logits(model)
    get_method("slicegpt")().run(lm, calib, PruneRequest(sparsity=0.0))
    after = _logits(model)
    assert (after - before).abs().max() < 1e-4


@pytest.mark.parametrize("slice_head", [False, True])
def test_sliced_shapes(stories, calib_file, slice_head):
    """By default (the reference's do_slice_head=False) the last block writes and the head
    reads the full width 64; with slice_head both are sliced to d."""
    record = _slice(stories, calib_file, 0.25, slice_head=slice_head)
    width = record.details["sliced_hidden_size"]
    head = width if slice_head else 64
    assert width == 48 and record.details["head_width"] == head
    adapter = stories.adapter
    assert adapter.embed.weight.shape == (512, width)
    assert adapter.lm_head.weight.shape == (512, head)
    last = adapter.num_layers - 1
    for index, block in enumerate(adapter.blocks):
        out = head if index == last else width
        assert block.attn_shortcut.shape == (width, width)
        assert block.mlp_shortcut.shape == (width, out)
        assert adapter.linear(block, "q").weight.shape == (64, width)
        assert adapter.linear(block, "k").weight.shape == (32, width)
        assert adapter.linear(block, "o").weight.shape == (width, 64)
        assert adapter.linear(block, "gate").weight.shape == (172, width)
        assert adapter.linear(block, "down").weight.shape == (out, 172)
    details = record.details
    assert details["decoder_parameters_after"] < details["decoder_parameters_before"]
    assert details["decoder_parameters_after"] == decoder_parameters(adapter)
    # PCA keeps more than the uniform share of the activations' energy
    assert min(record.details["kept_energy"]) > width / 64


def test_parameter_budget_picks_the_widest_slicing_that_fits(stories, calib_file):
    before = decoder_parameters(stories.adapter)
    width = width_for_parameters(stories.adapter, 0.2, 8, slice_head=False)
    record = _slice(stories, calib_file, 0.2, budget="parameters")
    after = decoder_parameters(stories.adapter)
    assert record.details["sliced_hidden_size"] == width
    assert after <= 0.8 * before
    assert record.details["decoder_share_removed"] == round(1 - after / before, 6)
    fresh = prunekit.load_model("stories260k").adapter
    assert sliced_parameters(fresh, width, slice_head=False) == after
    assert sliced_parameters(fresh, width + 8, slice_head=False) > 0.8 * before


def test_sliced_width_rounds_down():
    assert sliced_width(64, 0.0, 8) == 64
    assert sliced_width(64, 0.1, 8) == 56
    assert sliced_width(64, 0.1, 1) == 57
    assert sliced_width(576, 0.2, 8) == 456
    assert sliced_width(64, 0.99, 8) == 8


def test_ten_percent_slicing_degrades_gracefully(stories, tmp_path):
    """Calibrate on the first half of the TinyStories sample, evaluate on the second.

    stories260K has a 64-wide residual stream with little redundancy: 10% slicing
    (57 of 64 directions, no fine-tuning) costs about 2.2x perplexity here; 3x bounds it.
    """
    text = (settings.data_dir() / "data/text/tinystories/sample.txt").read_text()
    calib, held_out = tmp_path / "calib.txt", tmp_path / "held_out.txt"
    calib.write_text(text[: len(text) // 2])
    held_out.write_text(text[len(text) // 2 :])
    dense = prunekit.evaluate(stories, [str(held_out)], seqlen=128)[str(held_out)]
    prunekit.prune(
        stories, "slicegpt", 0.1, calib=str(calib), nsamples=8, seqlen=64, options={"round_to": 1}
    )
    sliced = prunekit.evaluate(stories, [str(held_out)], seqlen=128)[str(held_out)]
    assert dense["perplexity"] < sliced["perplexity"] < 3.0 * dense["perplexity"]


def test_saved_sliced_model_reloads_with_identical_logits(stories, calib_file, tmp_path):
    record = _slice(stories, calib_file, 0.25)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    before = _logits(stories.model, ids)
    out = prunekit.save(stories, tmp_path / "sliced", record)
    assert (out / "modeling_prunekit_sliced.py").is_file()
    assert json.loads((out / "prunekit.json").read_text())["layout"] == "sliced"
    reloaded = prunekit.load_pruned(out)
    assert torch.equal(_logits(reloaded.model, ids), before)
    assert torch.equal(_logits(prunekit.load_model(str(out)).model, ids), before)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "SlicedLlamaForCausalLM"
    assert type(remote).__module__.startswith("transformers_modules")
    assert torch.equal(_logits(remote, ids), before)


@pytest.mark.parametrize("family", ["opt", "gpt2", "gemma2"])
def test_families_without_rotation_invariance_are_rejected(family):
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(prunekit.PrunekitError, match="RMSNorm pre-norm"):
        get_method("slicegpt")().run(lm, IDS, PruneRequest(sparsity=0.2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_non_uniform_allocation_is_rejected():
    with pytest.raises(prunekit.PrunekitError, match="one width"):
        prunekit.api.plan_prune("slicegpt", 0.2, allocation="owl")


@pytest.mark.parametrize("family", ["qwen2", "gemma", "phi3"])
def test_sliced_tiny_families_reload_in_plain_transformers(family, tmp_path):
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))
    get_method("slicegpt")().run(lm, calib, PruneRequest(sparsity=0.25))
    before = _logits(model)
    out = save_pruned(lm, tmp_path / family, {"method": "slicegpt"})
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == f"Sliced{type(model).__name__}"
    torch.testing.assert_close(_logits(remote.eval()), before)
    torch.testing.assert_close(_logits(prunekit.load_pruned(out).model), before)


def test_sliced_model_generates_with_a_kv_cache(stories):
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    get_method("slicegpt")().run(stories, calib, PruneRequest(sparsity=0.25))
    prompt = torch.tensor([[1, 400, 300, 200]])
    cached = stories.model.generate(prompt, max_new_tokens=8, do_sample=False)
    uncached = prompt
    for _ in range(8):
        logits = _logits(stories.model, uncached)
        uncached = torch.cat([uncached, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached)


def test_the_outcome_line_explains_what_the_sparsity_became(stories):
    """`--sparsity` is SliceGPT's slicing ratio of the hidden width; the one-line outcome
    names the width, the rounding and the decoder-parameter share actually removed."""
    record = prunekit.prune(
        stories, "slicegpt", 0.2, calib="tinyshakespeare", nsamples=2, seqlen=32
    )
    details = record.details
    assert details["sliced_hidden_size"] == 48  # 64 x 0.8 = 51.2, rounded down to 8s
    assert record.outcome.startswith("hidden width 64 -> 48 (slicing ratio 0.250, rounded")
    assert f"({details['decoder_share_removed']:.1%} removed" in record.outcome
