"""LLM Surgeon against an implementation written here from Qualcomm-AI-research/llm-surgeon
(`curvature.KFAC` with `use_iad`, `utils.inv`, `Pruner.local_costs`, `threshold.*`,
`Pruner.weight_update` with `addupdate`, Kronecker rank 1), using plain `transformers`
autograd on the whole of stories260K: the K-FAC factors, the global masks and the updated
weights after one shot, unstructured and 2:4."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.engine.kfac import kfac_factors
from prunekit.methods import PruneRequest, get_method
from prunekit.surgery.masks import Pattern

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        f"{i}.{name}": getattr(layer.self_attn if name[0] in "qkvo" else layer.mlp, name)
        for i, layer in enumerate(model.model.layers)
        for name in LINEARS
    }


def reference_factors(model: nn.Module, windows: torch.Tensor) -> dict:
    """A = Σ x xᵀ / (n·L), G = Σ g gᵀ / (n·L), g the gradient of each window's mean loss."""
    mods = linears(model)
    sums = {k: [0, 0] for k in mods}
    hooks = []
    for key, mod in mods.items():

        def forward(m, inp, out, key=key):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            sums[key][0] = sums[key][0] + x.T @ x

            def backward(g, key=key):
                g = g.reshape(-1, g.shape[-1])
                sums[key][1] = sums[key][1] + g.T @ g

            out.register_hook(backward)

        hooks.append(mod.register_forward_hook(forward))
    for w in windows:
        model.zero_grad()
        loss = model(w[None], labels=w[None]).loss  # mean over the window's L-1 targets
        loss.backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    count = windows.numel()
    return {k: (a / count, g / count) for k, (a, g) in sums.items()}


def ref_inv(m, perc_damp):
    m = m.clone()
    m += perc_damp * torch.mean(torch.diag(m)) * torch.eye(len(m))
    return torch.cholesky_inverse(torch.linalg.cholesky(m.double())).float()


def reference_shot(model, factors, sparsity, nm=None, max_correlate=40):
    """One shot of the reference, all linears, damp_g 0.1, damp_a 0.01, addupdate."""
    mods = linears(model)
    state = {}
    for key, mod in mods.items():
        W = mod.weight.data.float().clone()
        A, G = factors[key]
        dead_cols = (~W.any(0)) | (A.diag() == 0)
        dead_rows = (~W.any(1)) | (G.diag() == 0)
        W[dead_rows, :] = 0
        W[:, dead_cols] = 0
        Ws = W[~dead_rows][:, ~dead_cols]
        Ginv = ref_inv(G[~dead_rows][:, ~dead_rows], 0.1)
        Ainv = ref_inv(A[~dead_cols][:, ~dead_cols], 0.01)
        sub = 0.5 * Ws**2 / torch.outer(Ginv.diag(), Ainv.diag())
        full = torch.zeros_like(W)
        full[torch.where(~dead_rows)[0][:, None], torch.where(~dead_cols)[0][None]] = sub
        state[key] = (W, Ws, Ginv, Ainv, dead_rows, dead_cols, full)
    # global threshold (the reference indexes sorted[int(s·N)]; the count here is round(s·N))
    if nm is None:
        allc = torch.sort(torch.cat([s[6].flatten() for s in state.values()]))[0]
        thr = allc[round(sparsity * len(allc)) - 1]
    else:
        n, m = nm
        blocks = torch.cat(
            [torch.sort(s[6].reshape(-1, m), 1)[0][:, : m - n].sum(1) for s in state.values()]
        )
        blocks = torch.sort(blocks)[0]
        thr = blocks[round(sparsity * m / (m - n) * len(blocks)) - 1]
    out = {}
    for key, (W, Ws, Ginv, Ainv, dead_rows, dead_cols, full) in state.items():
        if nm is None:
            mask_full = full <= thr
        else:
            n, m = nm
            blk = full.reshape(-1, m)
            srt = torch.sort(blk, 1)[0]
            local = blk <= srt[:, m - n - 1 : m - n]
            mask_full = (local & (srt[:, : m - n].sum(1) <= thr)[:, None]).view_as(full)
        mask = mask_full[~dead_rows][:, ~dead_cols]
        Qi = mask.nonzero()
        EQw = Ws[mask].view(-1, 1)
        # split into groups of whole rows (the reference's split_sizes loop)
        sizes_old = torch.unique(Qi[:, 0], return_counts=True)[1]
        sizes, count = [], 0
        for num in sizes_old.tolist():
            if count + num > max_correlate:
                sizes.append(count)
                count = num
            else:
                count += num
        sizes.append(count)
        W_errs = torch.zeros_like(Ws)
        for idx in torch.split(torch.arange(len(Qi)), sizes):
            if len(idx) == 0:
                continue
            r, c = Qi[idx, 0], Qi[idx, 1]
            e = EQw[idx] + W_errs[r, c].view(-1, 1)
            C = Ginv[r][:, r] * Ainv[c][:, c]
            Mat = torch.zeros_like(Ws)
            Mat[r, c] = torch.linalg.solve(C, e).view(-1)
            W_errs += -Ginv @ Mat @ Ainv
        Ws = Ws + W_errs
        Ws[mask] = 0
        W[torch.where(~dead_rows)[0][:, None], torch.where(~dead_cols)[0][None]] = Ws
        out[key] = W
    return out


@pytest.fixture
def windows(stories_calib):
    return stories_calib[:6, :64]


def test_kfac_factors_equal_whole_model_autograd(stories, windows):
    expected = reference_factors(stories.model, windows)
    got = {}

    def keep(index, factors):
        for path, (a, g) in factors.items():
            got[f"{index}.{path.split('.')[-1]}"] = (a, g)

    kfac_factors(stories.adapter, windows, keep, batch_size=4)
    assert got.keys() == expected.keys()
    for key, (a, g) in expected.items():
        torch.testing.assert_close(got[key][0], a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[key][1], g, rtol=1e-3, atol=1e-3 * g.abs().max().item())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_one_shot_matches_reference(stories, windows, pattern):
    nm = None if pattern == "unstructured" else (2, 4)
    factors = reference_factors(stories.model, windows)
    expected = reference_shot(stories.model, factors, 0.5, nm)
    method = get_method("llm_surgeon")(
        get_method("llm_surgeon").Config.from_options({"shots": 1, "max_correlate": 40})
    )
    method.run(stories, windows, PruneRequest(sparsity=0.5, pattern=Pattern.parse(pattern)))
    total = zeros = 0
    for key, mod in linears(stories.model).items():
        w = mod.weight.data
        assert torch.equal(w == 0, expected[key] == 0), key
        torch.testing.assert_close(w, expected[key], rtol=1e-3, atol=2e-4)
        total += w.numel()
        zeros += int((w == 0).sum())
        if nm:
            assert ((w != 0).reshape(-1, 4).sum(1) <= 2).all()
    assert zeros == round(0.5 * total)
    sparsities = [float((m.weight == 0).float().mean()) for m in linears(stories.model).values()]
    if nm is None:
        assert max(sparsities) - min(sparsities) > 0.05  # one global threshold, layers differ


def test_shots_reach_the_target_exactly(stories, windows):
    method = get_method("llm_surgeon")(get_method("llm_surgeon").Config(shots=3))
    facts = method.run(stories, windows, PruneRequest(sparsity=0.6))
    weights = [m.weight.data for m in linears(stories.model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * sum(w.numel() for w in weights))
    assert len(facts["llm_surgeon"]["calibration_loss"]) == 3


def reference_structured_shot(model, factors, sparsity):
    """One structured shot of the reference (`--structures row column`, krank 1,
    max_correlate 0, addupdate, damp_g = damp_a = 0.01)."""
    state = {}
    for key, mod in linears(model).items():
        W = mod.weight.data.float().clone()
        A, G = factors[key]
        dead_cols = (~W.any(0)) | (A.diag() == 0)
        dead_rows = (~W.any(1)) | (G.diag() == 0)
        assert not dead_rows.any() and not dead_cols.any()  # keeps this reference short
        Ginv, Ainv = ref_inv(G, 0.01), ref_inv(A, 0.01)
        row = 0.5 * torch.sum((W @ A) * W, 1) / Ginv.diag()
        col = 0.5 * torch.sum((G @ W) * W, 0) / Ainv.diag()
        state[key] = (W, Ginv, Ainv, row, col)
    # structured_threshold: per-layer cumulative removed weights, merged by cummax
    layer_losses, layer_values = [], []
    for W, _, _, row, col in state.values():
        losses = torch.cat([row, col])
        rl = torch.zeros(len(losses))
        rl[: len(row)] = 1
        srt, idx = torch.sort(losses)
        rc, cc = torch.cumsum(rl[idx], 0), torch.cumsum(1 - rl[idx], 0)
        layer_losses.append(srt)
        layer_values.append(rc * W.shape[1] + cc * W.shape[0] - rc * cc)
    every = torch.cat(layer_losses)
    placed, count = [], 0
    for v in layer_values:
        aug = torch.zeros_like(every)
        aug[count : count + len(v)] = v
        placed.append(aug)
        count += len(v)
    every, idx = torch.sort(every)
    final = sum(torch.cummax(x[idx], 0)[0] for x in placed)
    target_i = torch.where(final <= int(sparsity * final[-1]))[0].max()
    thr = every[target_i]
    out = {}
    for key, (W, Ginv, Ainv, row, col) in state.items():
        r_idx, c_idx = torch.where(row <= thr)[0], torch.where(col <= thr)[0]
        errs = torch.zeros_like(W)
        if len(r_idx):
            EQw = W[r_idx] + errs[r_idx]
            upd = -Ginv[:, r_idx] @ torch.linalg.solve(Ginv[r_idx][:, r_idx], EQw)
            upd[r_idx] = -W[r_idx]
            errs += upd
        if len(c_idx):
            EQw = W[:, c_idx] + errs[:, c_idx]
            upd = -EQw @ torch.linalg.inv(Ainv[c_idx][:, c_idx]) @ Ainv[c_idx]
            upd[:, c_idx] = -W[:, c_idx]
            errs += upd
        W = W + errs
        W[r_idx] = 0
        W[:, c_idx] = 0
        out[key] = W
    return out


def test_rows_columns_shot_matches_reference(stories, windows):
    factors = reference_factors(stories.model, windows)
    expected = reference_structured_shot(stories.model, factors, 0.3)
    config = get_method("llm_surgeon").Config(shots=1, structure="rows_columns")
    assert config.damp_g == 0.01
    get_method("llm_surgeon")(config).run(stories, windows, PruneRequest(sparsity=0.3))
    removed = total = 0
    for key, mod in linears(stories.model).items():
        w = mod.weight.data
        assert torch.equal(w == 0, expected[key] == 0), key
        torch.testing.assert_close(w, expected[key], rtol=1e-3, atol=2e-4)
        removed += int((w == 0).sum())
        total += w.numel()
    assert 0.25 < removed / total <= 0.3
