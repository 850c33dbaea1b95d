"""NAS structural pruning: the super-network's sub-networks (applied by hooks) compute what
the cut model computes and count its parameters exactly, the structures are ranked by
magnitude-SP importance (re-computed here from the weights), the Pareto front is the set
of non-dominated points, and the export honours the budget or the chosen point."""

from __future__ import annotations

import itertools

import pytest
import torch

import prunekit
from prunekit.methods.base import PruneRequest
from prunekit.methods.search.nas import NAS, pareto_front, super_network
from prunekit.surgery.masks import Pattern
from prunekit.surgery.width import decoder_parameters

REQUEST = PruneRequest(
    sparsity=0.3, pattern=Pattern(), scope="row", device="cpu", batch_size=4, seed=0
)
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
SUBNET = {"kv": [2, 3, 1, 4, 2], "intermediate": [100, 172, 30, 64, 90], "layers": [3]}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_largest_subnet_is_the_dense_model(stories, stories_calib):
    dense = _logits(stories.model)
    network = super_network(stories, stories_calib[:4, :64], REQUEST)
    with network.scales.attached():
        network.select(network.full)
        torch.testing.assert_close(_logits(stories.model), dense)


def test_a_subnet_equals_its_cut_model_and_parameter_count(stories, stories_calib):
    network = super_network(stories, stories_calib[:4, :64], REQUEST)
    with network.scales.attached():
        network.select(SUBNET)
        masked = _logits(stories.model)
    counted = network.parameters(SUBNET)
    kept = network.kept_blocks(SUBNET)
    network.cut(stories, SUBNET)
    assert decoder_parameters(stories.adapter) == counted
    assert len(stories.adapter.blocks) == 3
    for block, old in zip(stories.adapter.blocks, kept, strict=True):
        assert stories.adapter.linear(block, "k").weight.shape[0] == SUBNET["kv"][old] * 8
        assert stories.adapter.linear(block, "up").weight.shape[0] == SUBNET["intermediate"][old]
    torch.testing.assert_close(_logits(stories.model), masked, rtol=1e-4, atol=1e-4)


def test_structures_are_ranked_by_output_column_norms(stories, stories_calib):
    """order=magnitude_sp written out: a channel's score is ‖down[:, c]‖₂, a KV group's the
    sum of ‖o[:, j]‖₂ over its query heads' columns (8 per head, 2 heads per group)."""
    network = super_network(stories, stories_calib[:4, :64], REQUEST, "magnitude_sp")
    for i, block in enumerate(stories.adapter.blocks):
        down = block.mlp.down_proj.weight.detach()
        channels = down.norm(dim=0)
        assert torch.equal(network.channel_order[i], torch.argsort(channels, descending=True))
        columns = block.self_attn.o_proj.weight.detach().norm(dim=0)
        groups = columns.view(4, 16).sum(1)
        assert torch.equal(network.group_order[i], torch.argsort(groups, descending=True))


def test_structures_are_ranked_by_wanda_sp_by_default(stories, stories_calib):
    """Wanda-SP written out with plain hooks on the dense model: a column's score is the
    mean over rows of |W_ij|·‖X_j‖₂ of o / down, a KV group's the sum over its columns."""
    windows = stories_calib[:4, :64]
    norms: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().flatten(0, -2).double()
            norms[name] = norms.get(name, 0) + x.pow(2).sum(0)

        return fn

    handles = [
        getattr(getattr(block, part), proj).register_forward_pre_hook(hook(f"{i}.{proj}"))
        for i, block in enumerate(stories.model.model.layers)
        for part, proj in (("self_attn", "o_proj"), ("mlp", "down_proj"))
    ]
    with torch.no_grad():
        stories.model(windows)
    for handle in handles:
        handle.remove()
    network = super_network(stories, windows, REQUEST)
    for i, block in enumerate(stories.model.model.layers):
        down = block.mlp.down_proj.weight.detach().double().abs()
        channels = (down * norms[f"{i}.down_proj"].sqrt()).mean(0)
        assert torch.equal(network.channel_order[i], torch.argsort(channels, descending=True))
        o = block.self_attn.o_proj.weight.detach().double().abs()
        groups = (o * norms[f"{i}.o_proj"].sqrt()).mean(0).view(4, 16).sum(1)
        assert torch.equal(network.group_order[i], torch.argsort(groups, descending=True))


def test_pareto_front_is_the_non_dominated_set():
    generator = torch.Generator().manual_seed(3)
    points = [
        {"parameters": int(p), "nll": float(n)}
        for p, n in zip(
            torch.randint(0, 50, (40,), generator=generator),
            torch.rand(40, generator=generator),
            strict=True,
        )
    ]

    def dominated(a: dict) -> bool:
        return any(
            b["parameters"] <= a["parameters"]
            and b["nll"] <= a["nll"]
            and (b["parameters"], b["nll"]) != (a["parameters"], a["nll"])
            for b in points
        )

    front = pareto_front(points)
    expected = sorted(
        {(p["parameters"], p["nll"]) for p in points if not dominated(p)}, key=lambda t: t[0]
    )
    assert [(p["parameters"], p["nll"]) for p in front] == expected
    for a, b in itertools.pairwise(front):
        assert a["parameters"] < b["parameters"] and a["nll"] > b["nll"]


def _nas(stories, calib, **options):
    config = NAS.Config.from_options({"steps": 2, "samples": 10, **options})
    return NAS(config).run(stories, calib, REQUEST)


def test_export_is_the_best_front_point_within_the_budget(stories, stories_calib):
    calib = stories_calib[:8, :64]
    details = _nas(stories, calib)
    front, before = details["pareto_front"], details["decoder_parameters_before"]
    within = [p for p in front if p["parameters"] <= 0.7 * before]
    best = min(within, key=lambda p: p["nll"])
    assert front[details["chosen"]] == best
    assert decoder_parameters(stories.adapter) == best["parameters"]
    assert details["decoder_share_removed"] >= 0.3
    again = _nas(prunekit.load_model("stories260k"), calib)
    assert again["pareto_front"] == front  # same seed, same front


def test_point_picks_a_front_point_and_bad_points_are_refused(stories, stories_calib):
    calib = stories_calib[:8, :64]
    details = _nas(stories, calib, point=1, steps=0)
    assert details["chosen"] == 1
    assert decoder_parameters(stories.adapter) == details["pareto_front"][1]["parameters"]
    with pytest.raises(prunekit.PrunekitError, match="Pareto front has"):
        _nas(prunekit.load_model("stories260k"), calib, point=99, steps=0)
    with pytest.raises(prunekit.PrunekitError, match="valid: small, layer"):
        NAS.Config.from_options({"space": "huge"})
    with pytest.raises(prunekit.PrunekitError, match="give --nsamples > 4"):
        _nas(prunekit.load_model("stories260k"), calib[:4])


def test_layer_space_draws_a_width_per_block(stories, stories_calib):
    details = _nas(stories, stories_calib[:8, :64], space="layer", steps=0, samples=6)
    assert any(len(set(p["intermediate"])) > 1 for p in details["pareto_front"])
