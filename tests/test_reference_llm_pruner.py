"""LLM-Pruner against its reference (horseee/LLM-Pruner `TaylorImportance` and the
`acc_grad` loop of `hf_prune.py`), written again here, on every block of the real
stories260K with real calibration text.

Gradients come from plain autograd on the whole model (one backward of the mean token
loss over all windows; one backward per window for the Fisher `acc_grad`), not from
prunekit's block-wise backward. The salience (param_first / param_second / param_mix),
its per-channel reduction (Σ|s| or |Σ s|), the reduction over the group's linears and
then over a head's channels are the reference's, with GQA's query heads summed onto
their KV group's channels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunekit.methods import PruneRequest, get_method
from prunekit.surgery.plan import plan_block

ROWS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}
COLS = {"o": "self_attn.o_proj"}
MLP_ROWS = {"gate": "mlp.gate_proj", "up": "mlp.up_proj"}
MLP_COLS = {"down": "mlp.down_proj"}


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def gradients(model, windows):
    """(G, F) per parameter name: the batch loss gradient and mean per-window grad²."""
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for w in range(windows.shape[0]):
        model.zero_grad()
        lm_loss(model, windows[w : w + 1]).backward()
        for n, p in params.items():
            fisher[n] += p.grad * p.grad / windows.shape[0]
    model.zero_grad()
    lm_loss(model, windows).backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    return grads, fisher


def reference_scores(model, grads, fisher, layer, taylor, reduction):
    cfg = model.config
    hd, kv = cfg.head_dim, cfg.num_key_value_heads
    per_kv = cfg.num_attention_heads // kv

    def local(path, axis):
        name = f"model.layers.{layer}.{path}.weight"
        w = dict(model.named_parameters())[name].detach()
        g, f = grads[name], fisher[name]
        if taylor in ("param_first", "vectorize"):
            sal = w * g
        elif taylor == "param_second":
            sal = w * f * w
        else:  # param_mix
            sal = w * g - 0.5 * w * f * w
        other = 1 - axis
        return sal.sum(other).abs() if taylor == "vectorize" else sal.abs().sum(other)

    def reduce(stack):
        return {"sum": stack.sum(0), "max": stack.max(0).values, "prod": stack.prod(0)}[reduction]

    attn = []
    for role, path in {**ROWS, **COLS}.items():
        imp = local(path, 0 if role in ROWS else 1)
        if role in ("q", "o"):  # [heads·hd] -> the KV group's hd channels
            imp = imp.view(kv, per_kv, hd).sum(1)
        attn.append(imp.reshape(kv, hd))
    groups = reduce(torch.stack(attn)).sum(1)  # then over the head's consecutive channels
    mlp = [local(p, 0) for p in MLP_ROWS.values()] + [local(p, 1) for p in MLP_COLS.values()]
    return groups, reduce(torch.stack(mlp))


@pytest.mark.parametrize(
    ("importance", "order", "aggregation", "taylor"),
    [
        ("element", "first", "sum", "param_first"),
        ("vector", "first", "sum", "vectorize"),
        ("element", "second", "sum", "param_second"),
        ("element", "mix", "sum", "param_mix"),
        ("element", "first", "max", "param_first"),
        ("element", "first", "prod", "param_first"),
    ],
)
def test_llm_pruner_scores_equal_the_reference(
    stories, stories_calib, importance, order, aggregation, taylor
):
    calib = stories_calib[:4]
    method = get_method("llm_pruner")(
        get_method("llm_pruner").Config(importance=importance, order=order, aggregation=aggregation)
    )
    ours = {i: s for i, _, s in method.block_scores(stories, calib, PruneRequest(0.2), dense=True)}
    grads, fisher = gradients(stories.model, calib)
    for layer in range(stories.model.config.num_hidden_layers):
        groups, channels = reference_scores(
            stories.model, grads, fisher, layer, taylor, aggregation
        )
        torch.testing.assert_close(ours[layer].groups.float(), groups, rtol=2e-3, atol=1e-9)
        torch.testing.assert_close(ours[layer].channels.float(), channels, rtol=2e-3, atol=1e-9)


def test_llm_pruner_floors_the_removed_kv_groups():
    """1.9 groups' worth of budget removes 1 group (the reference floors pruned heads);
    the other width methods round to 2."""
    scores = torch.arange(4.0)
    from prunekit.surgery.plan import BlockCosts

    costs = BlockCosts(group=100, channel=10)
    removable = 4 * 100 + 40 * 10
    target = 1.9 / 4 * removable  # ratio · 4 groups = 1.9
    floored = plan_block(scores, torch.arange(40.0), costs, target, floor_groups=True)
    rounded = plan_block(scores, torch.arange(40.0), costs, target)
    assert len(floored.groups) == 3 and len(rounded.groups) == 2
