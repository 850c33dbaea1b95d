"""Surgery: removing KV groups / MLP channels equals masking them, on stories260K (GQA) and
tiny models of every family; config and shapes stay consistent; saved models reload."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.export.folder import save_pruned
from prunekit.models import LoadedModel, adapter_for
from prunekit.models.adapter import weight_matrix
from prunekit.surgery.plan import structure_ids
from prunekit.surgery.width import (
    block_widths,
    decoder_parameters,
    keep_channels,
    keep_heads,
    update_config_widths,
)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lm(family: str) -> LoadedModel:
    model = tiny_model(family)
    return LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)


def _prune_and_mask(lm: LoadedModel, uniform: bool) -> torch.nn.Module:
    """Remove KV groups and channels from every block of `lm`; return a copy of the original
    with the same structures masked to zero (o columns / down columns)."""
    reference = copy.deepcopy(lm.model)
    ref_adapter = adapter_for(reference)
    adapter = lm.adapter
    for i, (block, ref_block) in enumerate(zip(adapter.blocks, ref_adapter.blocks, strict=True)):
        widths = block_widths(adapter, block)
        ids = structure_ids(adapter, block)
        drop_group = 0 if uniform else i % widths.kv_heads
        drop_channels = [
            c for c in range(widths.intermediate) if c % 3 == (0 if uniform else i % 3)
        ]
        if adapter.spec.heads_removable:
            keep_heads(adapter, block, [g for g in range(widths.kv_heads) if g != drop_group])
            o = weight_matrix(ref_adapter.linear(ref_block, "o"))
            o[:, ids["o"].ids == drop_group] = 0
        keep_channels(
            adapter, block, [c for c in range(widths.intermediate) if c not in drop_channels]
        )
        weight_matrix(ref_adapter.linear(ref_block, "down"))[:, drop_channels] = 0
    update_config_widths(adapter)
    return reference


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_removing_nothing_keeps_logits_identical(family):
    lm = _lm(family)
    before = _logits(lm.model)
    for block in lm.adapter.blocks:
        widths = block_widths(lm.adapter, block)
        if lm.adapter.spec.heads_removable:
            keep_heads(lm.adapter, block, range(widths.kv_heads))
        keep_channels(lm.adapter, block, range(widths.intermediate))
    assert torch.equal(_logits(lm.model), before)


@pytest.mark.parametrize(
    "family, uniform", [("llama", True)] + [(f, False) for f in sorted(CONFIGS)]
)
def test_removal_equals_masking_and_generation_works(family, uniform, tmp_path):
    lm = _lm(family)
    original = _logits(lm.model)
    reference = _prune_and_mask(lm, uniform)
    pruned = _logits(lm.model)
    assert torch.allclose(pruned, _logits(reference), atol=1e-5)
    assert not torch.allclose(pruned, original, atol=1e-3)  # something was removed
    cached = lm.model.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = lm.model.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference.generate(IDS[:1], max_new_tokens=6, do_sample=False))
    out = save_pruned(lm, tmp_path / family, {})
    loaded = prunekit.load_pruned(out).model
    loaded.set_attn_implementation("eager")
    assert torch.equal(_logits(loaded), pruned)


def test_gqa_groups_are_never_split_on_stories(stories):
    """stories260K: 8 heads, 4 KV heads; keeping groups 1 and 3 keeps query heads 2,3,6,7."""
    adapter = stories.adapter
    block = adapter.blocks[2]
    q = weight_matrix(adapter.linear(block, "q")).clone()
    k = weight_matrix(adapter.linear(block, "k")).clone()
    o = weight_matrix(adapter.linear(block, "o")).clone()
    keep_heads(adapter, block, [3, 1])
    hd = adapter.head_dim
    heads = [2, 3, 6, 7]
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
    assert torch.equal(weight_matrix(adapter.linear(block, "q")), q[rows])
    assert torch.equal(weight_matrix(adapter.linear(block, "o")), o[:, rows])
    kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in (1, 3)])
    assert torch.equal(weight_matrix(adapter.linear(block, "k")), k[kv_rows])
    assert block_widths(adapter, block).heads == 4
    assert block_widths(adapter, block).kv_heads == 2


def test_uniform_widths_update_the_config(stories):
    adapter = stories.adapter
    before = decoder_parameters(adapter)
    for block in adapter.blocks:
        keep_heads(adapter, block, [0, 2, 3])
        keep_channels(adapter, block, range(100))
    assert update_config_widths(adapter) is None
    config = stories.model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (6, 3)
    assert config.intermediate_size == 100 and config.head_dim == 8
    attention = 64 * 8 * (6 + 3 + 3 + 6)  # q, k, v rows and o columns
    assert decoder_parameters(adapter) == 5 * (attention + 3 * 64 * 100 + 2 * 64)
    assert decoder_parameters(adapter) < before


def test_bad_indices_and_phi3_heads_are_rejected(stories):
    block = stories.adapter.blocks[0]
    with pytest.raises(prunekit.PrunekitError, match="keep at least one"):
        keep_heads(stories.adapter, block, [])
    with pytest.raises(prunekit.PrunekitError, match=r"in \[0, 4\)"):
        keep_heads(stories.adapter, block, [0, 4])
    with pytest.raises(prunekit.PrunekitError, match="distinct"):
        keep_channels(stories.adapter, block, [1, 1])
    phi3 = _lm("phi3")
    with pytest.raises(prunekit.PrunekitError, match="not supported for phi3"):
        keep_heads(phi3.adapter, phi3.adapter.blocks[0], [0])


def test_uniform_model_saves_as_a_standard_folder(stories, tmp_path):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    for block in stories.adapter.blocks:
        keep_heads(stories.adapter, block, [1, 2])
        keep_channels(stories.adapter, block, range(0, 172, 2))
    update_config_widths(stories.adapter)
    out = save_pruned(stories, tmp_path / "uniform", {"method": "test"})
    assert json.loads((out / "prunekit.json").read_text())["layout"] == "standard"
    assert not (out / "modeling_prunekit.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["intermediate_size"] == 86 and config["head_dim"] == 8
    assert not any(key.startswith("prunekit") for key in config)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(reloaded, ids), _logits(stories.model, ids))


_REMOTE_LOAD = """
import sys, torch
sys.modules["prunekit"] = None  # the folder must load without prunekit
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
print(type(model).__name__)
"""


def test_per_layer_model_loads_with_load_pruned_and_remote_code(stories, tmp_path):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    for i, block in enumerate(stories.adapter.blocks):
        keep_heads(stories.adapter, block, range(i % 4 + 1))
        keep_channels(stories.adapter, block, range(50 + 20 * i))
    widths = update_config_widths(stories.adapter)
    assert [w.kv_heads for w in widths] == [1, 2, 3, 4, 1]
    expected = _logits(stories.model, ids)
    out = save_pruned(stories, tmp_path / "perlayer", {"method": "test"})
    assert json.loads((out / "prunekit.json").read_text())["layout"] == "per_layer"
    with pytest.raises(Exception, match="size"):  # the plain class cannot hold it
        AutoModelForCausalLM.from_pretrained(out)
    loaded = prunekit.load_pruned(out)
    assert torch.equal(_logits(loaded.model, ids), expected)
    assert loaded.tokenizer is not None
    assert [block_widths(loaded.adapter, b) for b in loaded.adapter.blocks] == widths
    assert torch.equal(_logits(prunekit.load_model(str(out)).model, ids), expected)

    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _REMOTE_LOAD,
            str(out),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "o.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "PrunekitLlamaForCausalLM" in run.stdout
    assert torch.equal(torch.load(tmp_path / "o.pt"), expected)
