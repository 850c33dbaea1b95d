"""Bonsai: masked sub-models equal the cut model, seeded reproducibility, the parameter
budget, a deliberately damaged structure ranked least important, save -> reload."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.data import load_text
from prunekit.methods.width.bonsai import (
    CHANNELS,
    GROUP,
    BonsaiConfig,
    StructureMasks,
    build_units,
    estimate_harm,
    mean_loss,
    remove_units,
)
from prunekit.surgery.width import decoder_parameters

FAST = {"iterations": 2, "samples": 8, "channel_group": 32}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    """20k characters of Tiny Shakespeare (tokenizing the whole file is slow)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(load_text("tinyshakespeare", purpose="calib").text[:20000])
    return str(path)


def _bonsai(lm, calib, sparsity=0.2, seed=0, **options):
    return prunekit.prune(
        lm,
        "bonsai",
        sparsity=sparsity,
        calib=calib,
        nsamples=2,
        seqlen=32,
        seed=seed,
        options={**FAST, **options},
    )


def _unit(units, block, kind, position=0):
    return [i for i, u in enumerate(units) if u.block == block and u.kind == kind][position]


def test_units_cover_every_structure_once(stories):
    units = build_units(stories.adapter, channel_group=32)
    for block in range(5):
        groups = [m for u in units if u.block == block and u.kind == GROUP for m in u.members]
        channels = [m for u in units if u.block == block and u.kind == CHANNELS for m in u.members]
        assert sorted(groups) == [0, 1, 2, 3]
        assert sorted(channels) == list(range(172))
    assert sum(u.cost for u in units) < decoder_parameters(stories.adapter)


def test_masked_submodel_equals_the_cut_model(stories, stories_calib):
    windows = stories_calib[:4, :64]
    units = build_units(stories.adapter, channel_group=32)
    alive = torch.ones(len(units), dtype=torch.bool)
    alive[[_unit(units, 1, GROUP, 0), _unit(units, 3, GROUP, 2), _unit(units, 2, CHANNELS, 1)]] = 0
    masks = StructureMasks(stories.adapter, units)
    masks.set_alive(alive)
    with masks.attached():
        masked = mean_loss(stories.model, windows, batch_size=4)
        with torch.no_grad():
            masked_logits = stories.model(windows).logits
    remove_units(stories.adapter, units, alive)
    assert stories.adapter.linear(stories.adapter.blocks[1], "k").weight.shape[0] == 3 * 8
    assert mean_loss(stories.model, windows, batch_size=4) == pytest.approx(masked, abs=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(stories.model(windows).logits, masked_logits)


def test_same_seed_same_result(stories, calib_file):
    first = prunekit.load_model("stories260k")
    a = _bonsai(first, calib_file, seed=5)
    b = _bonsai(stories, calib_file, seed=5)
    assert a.details["kept"] == b.details["kept"]
    for p, q in zip(first.model.parameters(), stories.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_target_parameter_share_is_reached(stories, calib_file):
    units = build_units(stories.adapter, channel_group=32)
    before = decoder_parameters(stories.adapter)
    record = _bonsai(stories, calib_file, sparsity=0.3)
    removed = before - decoder_parameters(stories.adapter)
    assert record.details["decoder_parameters_after"] == before - removed
    assert removed <= 0.3 * before
    assert 0.3 * before - removed < max(u.cost for u in units)
    for block in stories.adapter.blocks:  # KV groups are never split
        q = stories.adapter.linear(block, "q").weight.shape[0]
        k = stories.adapter.linear(block, "k").weight.shape[0]
        assert q == 2 * k and k % 8 == 0 and k > 0


def test_damaged_structure_is_ranked_least_important(stories, stories_calib):
    units = build_units(stories.adapter, channel_group=32)
    damaged = _unit(units, 2, CHANNELS, 3)
    down = stories.adapter.linear(stories.adapter.blocks[2], "down")
    members = list(units[damaged].members)
    noise = torch.randn(
        down.weight.shape[0], len(members), generator=torch.Generator().manual_seed(0)
    )
    down.weight.data[:, members] = 3.0 * noise
    masks = StructureMasks(stories.adapter, units)
    alive = torch.ones(len(units), dtype=torch.bool)
    config = BonsaiConfig(samples=40, keep_ratio=0.8)
    with masks.attached():
        harm, fit = estimate_harm(
            stories.model,
            stories_calib[:2, :64],
            masks,
            alive,
            config,
            torch.Generator().manual_seed(0),
        )
    assert int(torch.argmin(harm)) == damaged
    assert harm[damaged] < 0  # removing it lowers the loss


def test_saved_bonsai_model_reloads_with_identical_logits(stories, calib_file, tmp_path):
    record = _bonsai(stories, calib_file, sparsity=0.25)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = stories.model(ids).logits
    out = prunekit.save(stories, tmp_path / "bonsai", record)
    reloaded = prunekit.load_pruned(out)
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, before)


@pytest.mark.parametrize(
    "options", [{"keep_ratio": 1.0}, {"samples": 1}, {"iterations": 0}, {"ridge": -1.0}]
)
def test_bad_options_are_rejected(stories, calib_file, options):
    with pytest.raises(prunekit.PrunekitError):
        _bonsai(stories, calib_file, **options)
