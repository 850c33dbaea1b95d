"""OWL's outlier ratios, DaSS and RIA against implementations written here from the
papers and the reference code (luuyin/OWL `lib/prune_all.py`, RIA's `prune_ria`, DaSS's
MLP-only scores), on the real stories260K with real calibration text.

Each linear's inputs are caught with forward hooks on the dense model; the Wanda metric,
outlier counts, RIA's relative importance and DaSS's intermediate-norm scores and masks
are computed here, never with prunekit's collectors or mask helpers. Block 0 sees the
same (dense) inputs in prunekit's sequential run, so its masks must agree exactly; for
OWL the reference computes every block's ratio on dense activations, as prunekit does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import block0_inputs

from prunekit.allocations import get_allocation
from prunekit.methods import PruneRequest, get_method
from prunekit.surgery.masks import Pattern

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def all_block_inputs(lm, calib) -> list[dict[str, torch.Tensor]]:
    """X [tokens, in] of every linear of every block on the dense model (forward hooks)."""
    caught = [{p: [] for p in LINEARS} for _ in lm.model.model.layers]
    hooks = []
    for i, block in enumerate(lm.model.model.layers):
        for p in LINEARS:
            hooks.append(
                block.get_submodule(p).register_forward_pre_hook(
                    lambda _m, a, i=i, p=p: caught[i][p].append(a[0].reshape(-1, a[0].shape[-1]))
                )
            )
    with torch.no_grad():
        for row in calib:
            lm.model(row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return [{p: torch.cat(x).double() for p, x in block.items()} for block in caught]


def reference_owl(lm, calib, sparsity, m=5.0, lam=0.08):
    """(outlier ratios in %, per-block sparsities) as `prune_wanda_outlier` computes them."""
    ratios = []
    for i, inputs in enumerate(all_block_inputs(lm, calib)):
        block = lm.model.model.layers[i]
        metrics = []
        for p in LINEARS:
            scaler_row = inputs[p].norm(dim=0) ** 2 / calib.shape[0]
            w = block.get_submodule(p).weight.detach().double()
            metrics.append((w.abs() * torch.sqrt(scaler_row.reshape(1, -1))).flatten())
        flat = torch.cat(metrics)
        ratios.append(float((flat > m * flat.mean()).sum()) / flat.numel() * 100)
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    density = r - np.mean(r) + (1 - sparsity)
    return ratios, (1 - density).tolist()


def test_owl_outlier_ratios_and_block_sparsities_equal_the_reference(stories, stories_calib):
    calib = stories_calib[:8]
    ratios, sparsities = reference_owl(stories, calib, 0.7)
    allocated = get_allocation("owl").allocate(stories, calib, PruneRequest(sparsity=0.7))
    assert [100 * r for r in allocated.details["outlier_ratios"]] == pytest.approx(ratios)
    assert allocated.ratios == pytest.approx(sparsities, abs=1e-7)


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask zeroing the n smallest of every m consecutive entries of each row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    for ii in range(0, scores.shape[1], m):
        tmp = scores[:, ii : ii + m]
        keep.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], False)
    return keep


def run_block0(lm, method, calib, pattern, sparsity=0.5, **options):
    cls = get_method(method)
    nm = Pattern.parse(pattern)
    request = PruneRequest(
        sparsity=nm.sparsity if nm.is_nm else sparsity, pattern=nm, scope=cls.default_scope
    )
    cls(cls.Config(**options)).run(lm, calib, request)
    block = lm.model.model.layers[0]
    return {p: block.get_submodule(p).weight.detach() for p in LINEARS}


def dense_block0(lm):
    block = lm.model.model.layers[0]
    return {p: block.get_submodule(p).weight.detach().clone().double() for p in LINEARS}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ria_masks_equal_the_reference(stories, stories_calib, pattern):
    """RIA: (|W|/col sum + |W|/row sum) · sqrt(scaler_row)^a, one threshold per layer
    (the reference's default) or N:M along rows."""
    calib = stories_calib[:8]
    x = block0_inputs(stories, calib, LINEARS)
    dense = dense_block0(stories)
    ours = run_block0(stories, "ria", calib, pattern)
    for p, w in dense.items():
        scaler_row = x[p].norm(dim=0) ** 2 / calib.shape[0]
        metric = (
            w.abs() / torch.sum(w.abs(), dim=0) + w.abs() / torch.sum(w.abs(), dim=1).reshape(-1, 1)
        ) * torch.sqrt(scaler_row.reshape(1, -1)) ** 0.5
        if pattern == "2:4":
            keep = nm_keep(metric, 2, 4)
            assert torch.equal(ours[p] != 0, keep), p
        else:
            thresh = torch.sort(metric.flatten())[0][int(metric.numel() * 0.5)]
            keep = metric > thresh  # the reference zeros `<= thresh`: one more weight
            agree = float(((ours[p] != 0) == keep).double().mean())
            assert agree >= 1 - 1.5 / w.numel(), p


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_dass_masks_equal_the_reference(stories, stories_calib, pattern):
    """DaSS: attention dense; down pruned by Wanda on the intermediate activations Z;
    gate and up by |W_ij| · ‖Z_i‖^0.5, compared across output channels (per input column,
    or N:M along the output axis)."""
    calib = stories_calib[:8]
    x = block0_inputs(stories, calib, LINEARS)
    dense = dense_block0(stories)
    ours = run_block0(stories, "dass", calib, pattern)
    z_norm = x["mlp.down_proj"].norm(dim=0)  # ‖Z_i‖ over all calibration tokens
    for p in LINEARS[:4]:
        assert torch.equal(ours[p].double(), dense[p]), p  # attention stays dense
    for p in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        w = dense[p]
        if p == "mlp.down_proj":
            metric = w.abs() * z_norm.reshape(1, -1)
            keep = (
                nm_keep(metric, 2, 4)
                if pattern == "2:4"
                else ~torch.zeros_like(metric, dtype=torch.bool).scatter_(
                    1, torch.sort(metric, dim=1, stable=True)[1][:, : w.shape[1] // 2], True
                )
            )
        else:
            metric = (w.abs() * z_norm.pow(0.5).reshape(-1, 1)).t()  # [in, out]
            keep = (
                nm_keep(metric, 2, 4)
                if pattern == "2:4"
                else ~torch.zeros_like(metric, dtype=torch.bool).scatter_(
                    1, torch.sort(metric, dim=1, stable=True)[1][:, : metric.shape[1] // 2], True
                )
            ).t()
        agree = float(((ours[p] != 0) == keep).double().mean())
        assert agree >= 0.999, (p, agree)
