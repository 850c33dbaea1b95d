"""ALPS and gradual ADMM against their references (mazumder-lab/ALPS `ALPS_admm` with its
`cg_batch`; fmfi-compbio/admm-pruning `fasterprune`), re-implemented here in the
references' orientation (Wᵀ, [in, out]) and in float64, on real layers of stories260K
with real calibration inputs: identical masks, weights within 1e-4."""

from __future__ import annotations

import pytest
import torch

from prunekit.methods.unstructured.alps import Alps, AlpsConfig
from prunekit.surgery.masks import Pattern, Target


def reference_alps(w, xtx, sp=0.5, nm=(0, 0), rho=0.1, max_iter=300, update_iter=3, switch_iter=30):
    """The reference loop, line by line in meaning (no prunekit code)."""
    w, xtx = w.double().clone(), xtx.double().clone()
    damp = 0.01 * torch.mean(torch.diag(xtx)).item()
    xtx += damp * torch.eye(xtx.shape[0], dtype=xtx.dtype)
    norm = torch.diag(xtx).sqrt() + 1e-8
    xtx = xtx / norm
    xtx = (xtx.T / norm).T
    ytx = (w * norm) @ xtx
    b = (w * norm).t().clone()
    b_orig = b.clone()
    totp, cout = b.shape
    v = torch.zeros_like(b)
    lam, q = torch.linalg.eigh(xtx)

    def inv(r):
        return q @ ((1 / (lam + r)) * q).T

    n, m = nm
    k = int(round((1 - sp) * totp * cout)) if n == 0 else totp * cout * n // m

    def project(x):
        if n == 0:
            flat = x.reshape(-1).clone()
            _, idx = torch.topk(-(flat**2), totp * cout - k)
            flat[idx] = 0
            return flat.reshape(totp, cout)
        g = x.t().reshape(-1, m).clone()
        _, idx = torch.topk(-(g**2), m - n, dim=1)
        g = g.scatter(1, idx, torch.zeros_like(idx, dtype=g.dtype))
        return g.reshape(cout, totp).t()

    d = project(b)
    d_init, supp_prev = d.clone(), (d == 0).double()
    init_rho = False
    xinv = inv(rho)
    for i in range(max_iter):
        b = xinv @ (ytx.T - v + rho * d)
        d = project((v + rho * b) / rho)
        v = v + rho * (b - d)
        if (i + 1) % update_iter == 0:
            supp = (d == 0).double()
            change = torch.sum((supp - supp_prev) ** 2).item()
            if change / k > 0.1:
                init_rho, rho = True, rho * 1.3
            elif change / k > 0.005:
                init_rho, rho = True, rho * 1.2
            elif change > 0.5:
                if init_rho:
                    rho *= 1.1
                else:
                    rho /= 5
                    b, d, v = b_orig.clone(), d_init.clone(), torch.zeros_like(b)
            else:
                if init_rho:
                    break
                rho /= 5
            supp_prev = supp.clone()
            rho = min(rho, 1e6)
            xinv = inv(rho)
            if i >= switch_iter and change / k < 0.0003:
                break
    b = project(b)
    support = (b != 0).double()
    # cg_batch(XtX, YtX.T, support, X0=B, rtol=1e-4, maxiter=10), identity preconditioner
    target = ytx.T
    x = b
    r = (target - xtx @ x) * support
    bnorm = torch.norm(target, dim=1)
    p = r
    r_prev = None
    for step in range(10):
        if step:
            beta = (r * r).sum(0) / torch.where(
                (r_prev * r_prev).sum(0) == 0, 1e-8, (r_prev * r_prev).sum(0)
            )
            p = r + beta.unsqueeze(0) * p
        ap = xtx @ p
        den = (p * ap).sum(0)
        alpha = (r * r).sum(0) / torch.where(den == 0, 1e-8, den)
        x = x + alpha.unsqueeze(0) * p
        r_prev = r
        r = (r - alpha.unsqueeze(0) * ap) * support
        if (torch.norm(xtx @ x - target, dim=1) <= 1e-4 * bnorm).all():
            break
    return (x.t() / norm).float(), i + 1


@pytest.fixture(scope="module")
def layers(stories_calib):
    """(weight, XᵀX) of block 2's q and down projections on real calibration inputs."""
    import prunekit

    lm = prunekit.load_model("stories260k")
    block = lm.adapter.blocks[2]
    out = {}
    for role in ("q", "down"):
        linear = lm.adapter.linear(block, role)
        grams: list[torch.Tensor] = []

        def hook(module, args, grams=grams):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams.append(x.T @ x)

        handle = linear.register_forward_pre_hook(hook)
        with torch.no_grad():
            lm.model(stories_calib[:8, :128])
        handle.remove()
        out[role] = (linear.weight.detach().clone(), sum(grams).float())
    return out


@pytest.mark.parametrize("role", ["q", "down"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_matches_the_reference(layers, role, pattern):
    weight, xtx = layers[role]
    nm = (0, 0) if pattern == "unstructured" else (2, 4)
    expected, iterations = reference_alps(weight, xtx, nm=nm)
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight.data = weight.clone()
    method = Alps(AlpsConfig())
    p = Pattern() if pattern == "unstructured" else Pattern(2, 4)
    target = Target(sparsity=0.5, pattern=p, scope="layer")
    method.prune_linear(module, {"hessian": xtx}, target, "x")
    got = module.weight.detach()
    same = ((got != 0) == (expected != 0)).float().mean().item()
    assert same == 1.0, same  # identical masks
    assert method.iterations[0] == iterations
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale  # float32 vs float64


def reference_admm_gradual(
    w, xx, sparsity=0.5, nm=(0, 0), percdamp=0.1, iterative_prune=15, iters=20
):
    """fmfi-compbio/admm-pruning `fasterprune` with its defaults (per_out=False)."""
    xx = xx.double().clone()
    norm = torch.diag(xx).sqrt() + 1e-8
    xx = xx / norm
    xx = (xx.T / norm).T
    w = (w.double() * norm).T  # [in, out]
    diag = torch.arange(xx.shape[0])
    xx[diag, diag] += percdamp
    xy = xx @ w
    xx[diag, diag] += 1.0  # rho = 1
    xxinv = torch.inverse(xx)
    u = torch.zeros_like(w)
    mask = None
    for itt in range(iters):
        if itt < iterative_prune:
            cur = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
            if nm[0]:
                wt = (w + u).T.reshape(w.shape[1] * w.shape[0] // 4, 4).abs()
                keep = torch.zeros(wt.shape, dtype=torch.bool)
                order = wt.sort(dim=1)[1]
                keep[torch.arange(wt.shape[0]), order[:, 2]] = 1
                keep[torch.arange(wt.shape[0]), order[:, 3]] = 1
                keep = keep.reshape(w.T.shape).T
                z2 = (w + u).abs()
                z2[keep] = torch.inf
                thres = z2.flatten().kthvalue(int(w.numel() * cur) + 1)[0]
                mask = z2 >= thres
            else:
                drop = torch.topk(
                    (w + u).abs().flatten(), k=int(w.numel() * sparsity), largest=False
                )
                mask = torch.ones(w.numel(), dtype=torch.bool)
                mask[drop.indices] = 0
                mask = mask.reshape(w.shape)
        z = (w + u) * mask
        u = u + (w - z)
        w = xxinv @ (xy + 1.0 * (z - u))
    z = (w + u) * mask
    return (z.T / norm).float()


@pytest.mark.parametrize("role", ["q", "down"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_gradual_matches_the_reference(layers, role, pattern):
    from prunekit.methods.unstructured.admm_gradual import AdmmGradual, AdmmGradualConfig

    weight, xtx = layers[role]
    nm = (0, 0) if pattern == "unstructured" else (2, 4)
    expected = reference_admm_gradual(weight, xtx, nm=nm)
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight.data = weight.clone()
    p = Pattern() if pattern == "unstructured" else Pattern(2, 4)
    AdmmGradual(AdmmGradualConfig()).prune_linear(
        module, {"hessian": xtx}, Target(sparsity=0.5, pattern=p, scope="layer"), "x"
    )
    got = module.weight.detach()
    same = ((got != 0) == (expected != 0)).float().mean().item()
    assert same == 1.0, same
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
