"""FLAP and Wanda-SP against their reference (CASIA-IVA-Lab/FLAP `lib/prune.py`), written
again here, on block 0 of the real stories260K with real calibration text.

The inputs of o_proj and down_proj are caught with hooks on the dense model; the metrics
(WIFV fluctuation, squared for attention; standardisation over a layer's channels, then
each head's mean z-score; Wanda-SP's mean |W|·‖X‖ over rows summed per head) are
computed here and compared with the scores prunekit's methods give.
"""

from __future__ import annotations

import torch
from helpers import block0_inputs

from prunekit.methods import PruneRequest, get_method

O_PROJ, DOWN = "self_attn.o_proj", "mlp.down_proj"


def first_block_scores(lm, calib, method):
    cls = get_method(method)
    instance = cls()
    _, block, scores = next(instance.block_scores(lm, calib, PruneRequest(0.2), dense=True))
    return instance, block, scores


def heads_of_groups(lm) -> torch.Tensor:
    """KV group of each o_proj input channel: [heads · head_dim]."""
    cfg = lm.model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    return torch.arange(cfg.num_attention_heads * hd) // hd // per_kv


def standarlization(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.mean(x, axis=-1, keepdim=True)) / torch.std(x, axis=-1, keepdim=True)


def test_flap_scores_equal_the_reference(stories, stories_calib):
    calib = stories_calib[:8]
    x = block0_inputs(stories, calib, (O_PROJ, DOWN))
    block = stories.model.model.layers[0]
    w_o = block.get_submodule(O_PROJ).weight.detach().double()
    w_down = block.get_submodule(DOWN).weight.detach().double()
    fluc_o = x[O_PROJ].var(dim=0)  # sample variance of each input channel
    fluc_down = x[DOWN].var(dim=0)
    attn = (fluc_o * torch.sum(w_o.pow(2), dim=0)) ** 2  # WIFV, squared for o_proj
    mlp = fluc_down * torch.sum(w_down.pow(2), dim=0)
    groups = heads_of_groups(stories)
    n_groups = int(groups.max()) + 1

    method, pruned_block, scores = first_block_scores(stories, calib, "flap")
    # uniform (UL-UM): a head's score is the sum of its channels' squared metric
    uniform = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, attn)
    torch.testing.assert_close(scores.groups.double(), uniform, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.channels.double(), mlp, rtol=1e-4, atol=0)
    # global (AL-AM): standardize over the layer's channels, mean z-score per head
    z = standarlization(attn)
    expected = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, z)
    expected /= torch.bincount(groups).double()
    got_groups, got_channels = method.global_scores(stories.adapter, pruned_block, scores)
    torch.testing.assert_close(got_groups.double(), expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got_channels.double(), standarlization(mlp), rtol=1e-3, atol=1e-4)


def test_wanda_sp_scores_equal_the_reference(stories, stories_calib):
    calib = stories_calib[:8]
    x = block0_inputs(stories, calib, (O_PROJ, DOWN))
    block = stories.model.model.layers[0]
    metric = {}
    for path in (O_PROJ, DOWN):
        w = block.get_submodule(path).weight.detach().double()
        scaler_row = x[path].norm(dim=0) ** 2 / x[path].shape[0]
        metric[path] = (w.abs() * torch.sqrt(scaler_row.reshape(1, -1))).mean(axis=0)
    groups = heads_of_groups(stories)
    heads = torch.zeros(int(groups.max()) + 1, dtype=torch.float64)
    heads.index_add_(0, groups, metric[O_PROJ])

    _, _, scores = first_block_scores(stories, calib, "wanda_sp")
    # prunekit's norm is ‖X_j‖ (no 1/√N): a constant factor, the same order
    scale = (scores.channels.double() / metric[DOWN]).mean()
    torch.testing.assert_close(scores.channels.double(), metric[DOWN] * scale, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.groups.double(), heads * scale, rtol=1e-4, atol=0)
