"""Magnitude, Wanda and SparseGPT against independent implementations written here from the
reference code (locuslab/wanda `lib/prune.py`, IST-DASLab/sparsegpt `sparsegpt.py`), on
block 0 of the real stories260K with real calibration text.

Nothing from prunekit is used for the part under test: the inputs X of each linear are
caught with forward hooks on the dense model, the statistics and masks computed here.
Known, documented difference: the references zero `int(numel · s) + 1` weights per
threshold (`<= thresh`); prunekit zeros exactly `round(numel · s)`, so per-layer masks
agree on all but about one weight per threshold.
"""

from __future__ import annotations

import pytest
import torch
from helpers import block0_inputs

from prunekit.methods import PruneRequest, get_method
from prunekit.surgery.masks import Pattern

PATHS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def block0_weights(lm) -> dict[str, torch.Tensor]:
    """Copies of block 0's weights under test, float32."""
    block = lm.model.model.layers[0]
    return {p: block.get_submodule(p).weight.detach().clone().float() for p in PATHS}


def run(lm, method: str, calib, pattern: str = "unstructured", sparsity: float = 0.5):
    cls = get_method(method)
    nm = Pattern.parse(pattern)
    request = PruneRequest(
        sparsity=nm.sparsity if nm.is_nm else sparsity,
        pattern=nm,
        scope=cls.default_scope,
    )
    cls().run(lm, calib, request)
    return block0_weights(lm)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions where the two weights are both zero or both nonzero."""
    return float(((a == 0) == (b == 0)).float().mean())


# -- the references, written again ---------------------------------------------------


def ref_magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    metric = w.abs()
    thresh = torch.sort(metric.flatten())[0][int(w.numel() * sparsity)]
    return w.masked_fill(metric <= thresh, 0)


def ref_wanda(w: torch.Tensor, x: torch.Tensor, sparsity: float, prune_n: int, prune_m: int):
    scaler_row = (x.float().norm(dim=0) ** 2) / x.shape[0]
    metric = w.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)  # True = pruned
    if prune_n:
        for ii in range(metric.shape[1]):
            if ii % prune_m == 0:
                tmp = metric[:, ii : ii + prune_m]
                mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    return w.masked_fill(mask, 0)


def ref_sparsegpt(w, x, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    w = w.clone().float()
    h = (2 / x.shape[0]) * (x.t() @ x).float()
    columns = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    diag = torch.arange(columns)
    h[diag, diag] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = w1**2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = w1[:, i : i + prunem] ** 2 / (torch.diag(hinv1)[i : i + prunem]) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


# -- the comparisons -----------------------------------------------------------------


@pytest.fixture
def calib(stories_calib):
    return stories_calib[:8]


def test_magnitude_is_one_threshold_per_layer(stories, calib):
    dense = block0_weights(stories)
    ours = run(stories, "magnitude", None)
    for path, w in dense.items():
        ref = ref_magnitude(w, 0.5)
        assert int((ref == 0).sum()) == int(w.numel() * 0.5) + 1
        assert int((ours[path] == 0).sum()) == round(w.numel() * 0.5)
        assert agreement(ours[path], ref) >= 1 - 1.5 / w.numel()


@pytest.mark.parametrize(("pattern", "prune_n", "prune_m"), [("unstructured", 0, 0), ("2:4", 2, 4)])
def test_wanda_masks_equal_the_reference(stories, calib, pattern, prune_n, prune_m):
    x = block0_inputs(stories, calib, PATHS)
    dense = block0_weights(stories)
    ours = run(stories, "wanda", calib, pattern)
    for path, w in dense.items():
        ref = ref_wanda(w, x[path], 0.5, prune_n, prune_m)
        assert agreement(ours[path], ref) == 1.0, path
        torch.testing.assert_close(ours[path], ref)


@pytest.mark.parametrize(
    ("pattern", "prunen", "prunem", "floor"),
    [("unstructured", 0, 0, 0.995), ("2:4", 2, 4, 0.999), ("1:4", 3, 4, 0.999)],
)
def test_sparsegpt_equals_the_reference(stories, calib, pattern, prunen, prunem, floor):
    """Same masks (up to the reference's one extra weight per column block) and the same
    updated weights, on q (shared Hessian with k, v), o and down of block 0."""
    x = block0_inputs(stories, calib, PATHS)
    dense = block0_weights(stories)
    ours = run(stories, "sparsegpt", calib, pattern)
    for path, w in dense.items():
        ref = ref_sparsegpt(w, x[path], 0.5, prunen, prunem)
        assert agreement(ours[path], ref) >= floor, path
        both = (ours[path] != 0) & (ref != 0)
        rel = (ours[path] - ref)[both].norm() / ref[both].norm()
        assert rel < (0.05 if prunen == 0 else 1e-3), path
        xf = x[path].float()
        err_ours = (xf @ (ours[path] - w).t()).norm()
        err_ref = (xf @ (ref - w).t()).norm()
        assert err_ours <= err_ref * 1.02, path
