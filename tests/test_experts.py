"""Expert pruning on tiny random-init MoE models of each family (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE): the pruned model equals the original with the removed experts'
router logits at -inf (the router re-implemented here per family), REAP scores equal a
direct computation, save -> reload gives identical logits, KV-cached generation works,
and bad requests are refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import prunekit
from prunekit.methods.base import PruneRequest
from prunekit.methods.experts.expert_prune import ExpertConfig, ExpertPrune, RoutedStatistics
from prunekit.models.families import adapter_for
from prunekit.models.loading import LoadedModel

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=24, num_local_experts=6)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=6, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        intermediate_size=48, moe_intermediate_size=16, num_experts=6,
        decoder_sparse_step=1, mlp_only_layers=[], head_dim=8)),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(intermediate_size=24, num_experts=6)),
}  # fmt: skip
IDS = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _tiny(family: str, seed: int = 0) -> LoadedModel:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    return LoadedModel(model, None, adapter_for(model), source=family)


def _mask_router(moe, removed: list[int], normalise: bool):
    """A forward hook giving the router's output with `removed` experts' logits at -inf."""

    def hook(module, args, output):
        x = args[0].reshape(-1, module.weight.shape[1])
        logits = F.linear(x, module.weight)
        logits[:, removed] = -math.inf
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, module.top_k, dim=-1)
        if normalise:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index

    return moe.gate.register_forward_hook(hook)


def _prune(lm, sparsity=1 / 3, criterion="reap"):
    request = PruneRequest(sparsity=sparsity, batch_size=2, seed=0)
    calib = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    return ExpertPrune(ExpertConfig(criterion=criterion)).run(lm, calib, request)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removed_experts_equal_router_logits_at_minus_infinity(family):
    lm = _tiny(family)
    reference = _tiny(family)
    details = _prune(lm)
    assert details["experts_after"] == 4
    normalise = family == "mixtral" or bool(
        getattr(reference.model.config, "norm_topk_prob", False)
    )
    handles = [
        _mask_router(reference.adapter.moe(block), details["removed_experts"][str(i)], normalise)
        for i, block in enumerate(reference.adapter.blocks)
    ]
    with torch.no_grad():
        expected = reference.model(IDS).logits
        got = lm.model(IDS).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(lm.model.config, key) == 4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_model_reloads_and_generates(family, tmp_path):
    lm = _tiny(family, seed=2)
    _prune(lm)
    lm.model.save_pretrained(tmp_path / family)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, lm.model(IDS).logits)
        out = reloaded.generate(IDS[:1], max_new_tokens=5, do_sample=False, use_cache=True)
        plain = reloaded.generate(IDS[:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, plain)


def test_reap_score_is_the_mean_gate_weighted_output_norm():
    lm = _tiny("mixtral", seed=3)
    moe = lm.adapter.moe(lm.adapter.blocks[0])
    stats = RoutedStatistics(moe)
    captured = {}

    def grab(module, args):
        captured["x"], captured["index"], captured["w"] = (a.detach() for a in args[:3])

    handle = moe.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        lm.model(IDS)
    handle.remove()
    stats.handle.remove()
    x, index, w = captured["x"], captured["index"], captured["w"]
    experts = moe.experts
    for e in range(6):
        tokens, slots = torch.where(index == e)
        if not tokens.numel():
            assert stats.count[e] == 0
            continue
        with torch.no_grad():
            gate, up = (x[tokens] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ experts.down_proj[e].T
        expected = float((w[tokens, slots] * y.norm(dim=-1)).mean())
        assert float(stats.scores("reap")[e]) == pytest.approx(expected, rel=1e-5)
        assert float(stats.scores("frequency")[e]) == tokens.numel()


def test_refusals(stories):
    lm = _tiny("mixtral")
    with pytest.raises(prunekit.PrunekitError, match="fewer than top_k=2"):
        _prune(lm, sparsity=0.9)
    with pytest.raises(prunekit.PrunekitError, match="needs a mixture-of-experts model"):
        prunekit.prune(stories, "expert_prune", sparsity=0.5, calib="tinystories", nsamples=2,
                       seqlen=32)  # fmt: skip
    with pytest.raises(prunekit.PrunekitError, match="does not prune mixture-of-experts"):
        prunekit.api.check_architecture(prunekit.api.get_method("flap"), lm)


def _routed_twins():
    """Two copies of a tiny Mixtral whose routers never pick expert 5 (hooks to remove),
    calibration ids [4, 16], and per block the dense copy's experts-module inputs for
    them: (x [tokens, H], index [tokens, top_k])."""
    lm = _tiny("mixtral", seed=4)
    dense = _tiny("mixtral", seed=4)
    calib = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    handles = [_mask_router(m.adapter.moe(b), [5], True) for m in (lm, dense)
               for b in m.adapter.blocks]  # fmt: skip
    routed: dict[int, tuple] = {}

    def keep(i: int):
        def hook(module, args) -> None:  # a pre-hook returning None leaves args as they are
            routed[i] = (args[0].detach(), args[1].detach())

        return hook

    for i, block in enumerate(dense.adapter.blocks):
        handles.append(dense.adapter.moe(block).experts.register_forward_pre_hook(keep(i)))
    with torch.no_grad():
        dense.model(calib)
    return lm, dense, calib, routed, handles


def test_expert_wanda_uses_the_routed_tokens_and_skips_unreached_experts():
    from prunekit.methods.experts.expert_wanda import ExpertWanda
    from prunekit.surgery.masks import Pattern

    lm, dense, calib, routed, handles = _routed_twins()
    request = PruneRequest(sparsity=0.5, pattern=Pattern(), batch_size=2, seed=0)
    details = ExpertWanda().run(lm, calib, request)
    for handle in handles:
        handle.remove()
    assert details["experts_no_calibration_token_reached"] == {"0": [5], "1": [5]}
    for i, block in enumerate(lm.adapter.blocks):
        experts, original = (
            lm.adapter.moe(block).experts,
            dense.adapter.moe(dense.adapter.blocks[i]).experts,
        )
        assert torch.equal(experts.gate_up_proj[5], original.gate_up_proj[5])  # left dense
        x, index = routed[i]
        for e in range(5):
            norms = x[torch.where(index == e)[0]].pow(2).sum(0).sqrt()
            w = original.gate_up_proj[e].detach()
            scores = w.abs() * norms
            k = round(0.5 * w.shape[1])
            drop = torch.topk(scores, k, dim=1, largest=False).indices
            expected = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
            assert torch.equal(experts.gate_up_proj[e] != 0, expected), (i, e)
            assert int((experts.down_proj[e] == 0).sum()) == experts.down_proj[e].numel() // 2


def test_merging_folds_removed_experts_into_the_most_similar_by_routing_mass():
    from prunekit.methods.experts.expert_prune import merge_into_similar

    lm = _tiny("mixtral", seed=5)
    experts = lm.adapter.moe(lm.adapter.blocks[0]).experts
    with torch.no_grad():  # expert 4 is a near copy of expert 1
        experts.gate_up_proj[4] = experts.gate_up_proj[1] + 0.01
        experts.down_proj[4] = experts.down_proj[1] + 0.01
    before = experts.gate_up_proj.detach().clone()
    mass = torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    targets = merge_into_similar(experts, [4], mass)
    assert targets == {4: 1}
    expected = (before[1] * 3.0 + before[4] * 1.0) / 4.0
    torch.testing.assert_close(experts.gate_up_proj[1].detach(), expected)
    lm2 = _tiny("olmoe", seed=6)
    request = PruneRequest(sparsity=1 / 3, batch_size=2, seed=0)
    calib = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    details = ExpertPrune(ExpertConfig(merge=True)).run(lm2, calib, request)
    assert set(details["merged_into"]["0"]) == set(details["removed_experts"]["0"])
    assert lm2.model.config.num_experts == 4


def test_expert_sparsegpt_equals_sparsegpt_on_each_experts_routed_tokens():
    import torch.nn.functional as F
    from test_reference_unstructured import ref_sparsegpt

    from prunekit.methods.experts.expert_sparsegpt import ExpertSparseGPT
    from prunekit.surgery.masks import Pattern, is_valid_nm

    lm, dense, calib, routed, handles = _routed_twins()
    request = PruneRequest(sparsity=0.5, pattern=Pattern(2, 4), batch_size=2, seed=0)
    details = ExpertSparseGPT().run(lm, calib, request)
    for handle in handles:
        handle.remove()
    assert details["experts_no_calibration_token_reached"] == {"0": [5], "1": [5]}
    experts = lm.adapter.moe(lm.adapter.blocks[0]).experts
    original = dense.adapter.moe(dense.adapter.blocks[0]).experts
    assert torch.equal(experts.down_proj[5], original.down_proj[5])  # left dense
    x, index = routed[0]
    for e in range(5):
        inputs = x[torch.where(index == e)[0]].float()
        gate, up = F.linear(inputs, original.gate_up_proj[e].detach()).chunk(2, dim=-1)
        hidden = original.act_fn(gate) * up
        for got, w, xs in (
            (experts.gate_up_proj[e], original.gate_up_proj[e], inputs),
            (experts.down_proj[e], original.down_proj[e], hidden),
        ):
            ref = ref_sparsegpt(w.detach(), xs, 0.5, prunen=2, prunem=4)
            assert torch.equal(got != 0, ref != 0), e
            torch.testing.assert_close(got.detach(), ref, rtol=1e-3, atol=1e-4)
            assert is_valid_nm(got, 2, 4)
