"""The sequential engine reproduces the model's own forward pass, for every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, tiny_model

from prunekit.engine import COLLECTORS, SequentialRunner, attach_collectors
from prunekit.engine.capture import capture_inputs
from prunekit.models import adapter_for
from prunekit.models.adapter import weight_matrix


def _last_hidden(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_runner_reproduces_forward(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    runner = SequentialRunner(adapter, ids, batch_size=2, progress=None)
    for _ctx in runner:
        pass
    final = adapter.final_norm(runner.hidden)
    expected = _last_hidden(model, ids)
    # hidden_states[-1] is taken after the final norm in every family here
    torch.testing.assert_close(final, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_adapter_finds_every_block_linear(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    linears = adapter.linears(adapter.blocks[0])
    weights = sum(weight_matrix(m).numel() for m in linears.values())
    block_matrices = sum(p.numel() for n, p in adapter.blocks[0].named_parameters() if p.dim() == 2)
    assert weights == block_matrices  # every 2-D weight of a block is a known linear


def test_collectors_see_every_calibration_token(stories, stories_calib):
    runner = SequentialRunner(stories.adapter, stories_calib, batch_size=5, progress=None)
    ctx = next(iter(runner))
    stats = ctx.collect(["input_norm", "hessian", "input_mean", "input_variance"])
    q = stats["self_attn.q_proj"]
    with torch.no_grad():
        x = stories.adapter.norm(ctx.block, "attn")(runner.hidden)
    x = x.reshape(-1, x.shape[-1]).double()
    torch.testing.assert_close(
        q["input_norm"].double(), x.pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        q["hessian"].double(), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(q["input_mean"].double(), x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q["input_variance"].double(), x.var(0), rtol=1e-4, atol=1e-6)


def test_capture_keeps_each_blocks_own_arguments():
    model = tiny_model("gemma3_text")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    captured = capture_inputs(adapter_for(model), ids, batch_size=2)
    masks = [call.kwargs.get("attention_mask") for call in captured.calls[2]]
    assert len(masks) == 3
    assert masks[0] is not None
    # sliding-window and full-attention blocks receive different masks
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


def test_linears_reading_one_tensor_share_their_collectors(stories, stories_calib):
    """q/k/v (and gate/up) read the same tensor: one statistic, computed once per batch."""
    runner = SequentialRunner(stories.adapter, stories_calib, batch_size=4, progress=None)
    ctx = next(iter(runner))
    modules = ctx.linears()
    with attach_collectors(modules, ["hessian"], "cpu") as found:
        ctx.forward()
    attn = [found[f"self_attn.{p}_proj"] for p in "qkv"]
    mlp = [found[f"mlp.{p}_proj"] for p in ("gate", "up")]
    assert attn[0] is attn[1] is attn[2] and mlp[0] is mlp[1]
    assert found["self_attn.o_proj"] is not attn[0] and found["mlp.down_proj"] is not mlp[0]
    assert attn[0]["hessian"].tokens == stories_calib.numel()  # updated once per batch


def test_hessian_from_its_upper_blocks_equals_xtx():
    """The collector accumulates only the block upper triangle of XᵀX; the result is whole."""
    torch.manual_seed(0)
    batches = [torch.randn(300, 301) @ torch.randn(301, 301) + 3 for _ in range(3)]
    stat = COLLECTORS["hessian"](301, torch.device("cpu"))
    for x in batches:
        stat.update(x)
    x = torch.cat(batches).double()
    expected = 2 * x.t() @ x / x.shape[0]
    torch.testing.assert_close(stat.result().double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(stat.result(), stat.result().t())


def test_variance_survives_a_large_mean():
    """Batch-merged moments: a channel with mean 1e4 and std 1e-2 keeps its variance."""
    torch.manual_seed(0)
    batches = [1e4 + 1e-2 * torch.randn(500, 3) for _ in range(4)]
    stat = COLLECTORS["input_variance"](3, torch.device("cpu"))
    for x in batches:
        stat.update(x)
    expected = torch.cat(batches).double().var(0)
    torch.testing.assert_close(stat.result().double(), expected, rtol=0.05, atol=0)


def test_outputs_overwriting_inputs_give_the_same_activations(stories, stories_calib):
    """`overwrite_inputs=True` reuses one buffer; every block sees the same inputs."""
    seen = {}
    for overwrite in (False, True):
        runner = SequentialRunner(
            stories.adapter,
            stories_calib,
            batch_size=5,
            progress=None,
            overwrite_inputs=overwrite,
        )
        seen[overwrite] = [ctx.inputs.clone() for ctx in runner] + [runner.hidden]
    for a, b in zip(seen[False], seen[True], strict=True):
        assert torch.equal(a, b)
