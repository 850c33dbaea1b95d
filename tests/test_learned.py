"""The learned-mask methods (Sheared LLaMA, Compresso, NutePrune) and their hard-concrete core: gates at their extremes give the dense model and
the cut model, the differentiable parameter count equals the real count after surgery,
Lagrangian training ends exactly at the target shape, and the result loads in plain
transformers."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.export.folder import save_pruned
from prunekit.methods.base import PruneRequest
from prunekit.methods.learned.base import cut, fold, parse_target
from prunekit.methods.learned.compresso import Compresso
from prunekit.methods.learned.hard_concrete import BETA, GAMMA, ZETA, HardConcrete, ModelGates
from prunekit.methods.learned.nuteprune import NutePrune
from prunekit.methods.learned.sheared_llama import ShearedLlama
from prunekit.models.families import adapter_for
from prunekit.models.loading import LoadedModel
from prunekit.surgery.masks import Pattern
from prunekit.surgery.width import decoder_parameters

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
ON, OFF = 30.0, -30.0


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _set_extremes(gates: ModelGates, hidden: bool = False) -> None:
    with torch.no_grad():
        for g in (*gates.kv, *gates.intermediate, gates.layers, gates.hidden):
            g.log_alpha.fill_(ON)
        gates.kv[1].log_alpha[0] = OFF
        gates.intermediate[2].log_alpha[5:40] = OFF
        gates.layers.log_alpha[3] = OFF
        if hidden:
            gates.hidden.log_alpha[[0, 7, 8, 30, 63]] = OFF


def test_hard_concrete_keep_probability_is_the_formula():
    gates = HardConcrete(5, keep=0.8)
    torch.testing.assert_close(gates.keep_probability(), torch.full((5,), 0.8))
    a = torch.tensor([-2.0, 0.0, 3.0])
    gates.log_alpha.data = a.clone()
    expected = 1 / (1 + torch.exp(-(a - BETA * math.log(-GAMMA / ZETA))))
    torch.testing.assert_close(gates.keep_probability(), expected)
    samples = torch.stack([gates.sample(torch.Generator().manual_seed(i)) for i in range(4000)])
    empirical = (samples > 0).float().mean(0)
    torch.testing.assert_close(empirical, expected.detach(), atol=0.03, rtol=0)


@pytest.mark.parametrize("hidden", [False, True])
def test_open_gates_give_the_dense_model(stories, hidden):
    dense = _logits(stories.model)
    gates = ModelGates(stories.adapter)
    with torch.no_grad():
        for g in (*gates.kv, *gates.intermediate, gates.layers, gates.hidden):
            g.log_alpha.fill_(ON)
    gates.draw(torch.Generator().manual_seed(0))  # sampled: exactly 1 at these odds
    with gates.attached(hidden=hidden):
        torch.testing.assert_close(_logits(stories.model), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [False, True])
def test_closed_gates_equal_the_cut_model_and_its_parameter_count(stories, hidden):
    """The masked model (hidden gates renormalising the RMS norms over open coordinates)
    computes what the cut model computes with transformers' own RMSNorm."""
    gates = ModelGates(stories.adapter)
    _set_extremes(gates, hidden)
    gates.draw(None)
    with gates.attached(hidden=hidden):
        masked = _logits(stories.model)
    expected = float(gates.expected_parameters().detach())
    masks = gates.binary_masks()
    cut(stories, masks)
    width = 64 - 5 if hidden else 64
    assert len(stories.adapter.blocks) == 4
    assert stories.adapter.linear(stories.adapter.blocks[1], "k").weight.shape == (3 * 8, width)
    assert stories.adapter.linear(stories.adapter.blocks[2], "up").weight.shape[0] == 172 - 35
    assert stories.adapter.linear(stories.adapter.blocks[2], "down").weight.shape[0] == width
    assert stories.model.config.hidden_size == width
    torch.testing.assert_close(_logits(stories.model), masked, rtol=1e-5, atol=1e-5)
    assert expected == pytest.approx(decoder_parameters(stories.adapter), rel=1e-6)


def test_hidden_gates_renormalise_like_llm_shearing(stories):
    """One norm under a fractional hidden gate, against LLM-Shearing's `LlamaRMSNorm`
    with `hidden_z` (variance over the coordinates whose gate is nonzero, output · z)."""
    gates = ModelGates(stories.adapter)
    z = torch.rand(64, generator=torch.Generator().manual_seed(1))
    z[[3, 9, 40]] = 0.0
    gates.values = {"hidden": [z], "kv": [], "intermediate": [], "layers": []}
    norm = stories.adapter.norm(stories.adapter.blocks[0], "attn")
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)) * z
    remaining = torch.where(~z.eq(0))[0]
    variance = x.index_select(-1, remaining).pow(2).mean(-1, keepdim=True)
    reference = norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon)) * z
    with gates.attached(hidden=True):
        torch.testing.assert_close(norm(x), reference, rtol=1e-5, atol=1e-6)


def test_lagrangian_training_ends_exactly_at_the_target(stories, stories_calib, tmp_path):
    target = "kv:2,intermediate:96,layers:4"
    with torch.no_grad():
        gates_before = ModelGates(stories.adapter).expected_counts()
    method = ShearedLlama(ShearedLlama.Config(target=target, steps=40, lr=0.2))
    request = PruneRequest(
        sparsity=0.5, pattern=Pattern(), scope="row", device="cpu", batch_size=4, seed=0
    )
    details = method.run(stories, stories_calib[:8, :64], request)
    assert details["target"] == parse_target(target)
    assert len(stories.adapter.blocks) == 4
    for block in stories.adapter.blocks:
        assert stories.adapter.linear(block, "k").weight.shape[0] == 2 * 8
        assert stories.adapter.linear(block, "up").weight.shape[0] == 96
    end = details["expected_counts_at_end"]
    assert abs(end["kv"] - 10) < abs(float(gates_before["kv"].sum()) - 10)
    assert abs(end["intermediate"] - 480) < abs(float(gates_before["intermediate"].sum()) - 480)
    logits = _logits(stories.model)
    out = tmp_path / "sheared"
    save_pruned(stories, out, {"method": "sheared_llama"})
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(plain), logits)


def test_lagrangian_training_reaches_a_hidden_target(stories, stories_calib, tmp_path):
    config = ShearedLlama.Config(target="hidden:48,intermediate:128", steps=80)
    method = ShearedLlama(config)
    details = method.run(stories, stories_calib[:8, :64], REQUEST)
    assert details["target"] == {"hidden": 48, "intermediate": 128}
    assert stories.model.config.hidden_size == 48
    for block in stories.adapter.blocks:
        assert stories.adapter.linear(block, "q").weight.shape == (64, 48)
        assert stories.adapter.linear(block, "o").weight.shape == (48, 64)
        assert stories.adapter.norm(block, "mlp").weight.shape == (48,)
    assert stories.adapter.embed.weight.shape[1] == 48
    start = 64 * config.init_keep  # the multipliers pull the expected width to 48
    assert abs(details["expected_counts_at_end"]["hidden"] - 48) < 0.75 * abs(start - 48)
    logits = _logits(stories.model)
    out = tmp_path / "sheared_hidden"
    save_pruned(stories, out, {"method": "sheared_llama"})
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.hidden_size == 48 and plain.config.head_dim == 8
    torch.testing.assert_close(_logits(plain), logits)


def test_hidden_targets_need_rms_pre_norms():
    model = tiny_model("gpt2")
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source="gpt2")
    method = ShearedLlama(ShearedLlama.Config(target="hidden:16", steps=1))
    with pytest.raises(prunekit.PrunekitError, match="RMSNorm pre-norm"):
        method.run(lm, torch.zeros(2, 8, dtype=torch.long), REQUEST)


def test_bad_targets_are_rejected():
    with pytest.raises(prunekit.PrunekitError, match="valid: kv, intermediate, layers, hidden"):
        parse_target("heads:3")
    with pytest.raises(prunekit.PrunekitError):
        parse_target("kv:0")


REQUEST = PruneRequest(
    sparsity=0.5, pattern=Pattern(), scope="row", device="cpu", batch_size=4, seed=0
)


@pytest.mark.parametrize("method", [Compresso, NutePrune])
def test_lora_methods_end_at_the_target_with_lora_merged(stories, stories_calib, method):
    config = method.Config(target="kv:3,intermediate:120", steps=6, lr=0.2, lora_rank=4)
    details = method(config).run(stories, stories_calib[:8, :64], REQUEST)
    for block in stories.adapter.blocks:
        assert stories.adapter.linear(block, "k").weight.shape[0] == 3 * 8
        assert stories.adapter.linear(block, "up").weight.shape[0] == 120
        assert not hasattr(stories.adapter.linear(block, "up"), "parametrizations")
    assert details["decoder_share_removed"] > 0.2


def test_compresso_prompt_is_prepended_and_skipped_by_the_loss(stories, stories_calib):
    method = Compresso(Compresso.Config(prompt="default"))
    batches = method.prepare_batches(stories, stories_calib[:4, :128], 2)
    ids = stories.tokenizer(
        "Attention! LLM, you are undergoing optimization", add_special_tokens=False
    ).input_ids
    assert batches[0].shape == (2, 128)
    assert batches[0][0, : len(ids)].tolist() == ids
    assert torch.equal(
        batches[0][:, method.prompt_len :], stories_calib[:2, : 128 - method.prompt_len]
    )


def test_targets_tighten_from_full_width_to_the_target():
    from prunekit.methods.learned.sheared_llama import warmed_target

    full, target = {"kv": 4, "intermediate": 172, "layers": 5}, {"kv": 2, "intermediate": 100}
    assert warmed_target(full, target, 0, 5) == {"kv": 4.0, "intermediate": 172.0}
    assert warmed_target(full, target, 4, 5)["kv"] == pytest.approx(4 - 2 * 0.8)
    assert warmed_target(full, target, 9, 5) == {"kv": 2.0, "intermediate": 100.0}
    assert warmed_target(full, target, 0, 0) == {"kv": 2.0, "intermediate": 100.0}
    method = NutePrune(NutePrune.Config(steps=10, ramp=0.5))
    assert method.warmup_steps() == 5


def test_lagrangian_is_on_per_block_sparsities():
    from prunekit.methods.learned.sheared_llama import lagrangian

    lm = prunekit.load_model("stories260k")
    gates = ModelGates(lm.adapter, keep=0.5)  # expected sparsity 0.5 everywhere
    lam = {"kv": torch.tensor([2.0, 3.0])}
    got = float(lagrangian(gates, {"kv": 1}, lam).detach())  # target sparsity 1 - 1/4 = 0.75
    assert got == pytest.approx(2.0 * (0.5 - 0.75) + 3.0 * (0.5 - 0.75) ** 2, rel=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "gemma", "phi3"])
def test_hidden_cut_matches_masks_and_count_on_other_families(family):
    """q/k/v biases (qwen2), the (1 + w) norm and scaled embedding (gemma), fused
    qkv / gate_up (phi3): the masked model equals the cut one and the expected count is
    the real count."""
    model = tiny_model(family)
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source=family)
    gates = ModelGates(lm.adapter)
    with torch.no_grad():
        for g in (*gates.kv, *gates.intermediate, gates.layers, gates.hidden):
            g.log_alpha.fill_(ON)
        if lm.adapter.spec.heads_removable:  # phi3 slices its fused qkv by the config
            gates.kv[0].log_alpha[1] = OFF
        gates.intermediate[1].log_alpha[:9] = OFF
        gates.hidden.log_alpha[[2, 5, 11]] = OFF
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    gates.draw(None)
    with gates.attached(hidden=True), torch.no_grad():
        masked = lm.model(ids).logits
    expected = float(gates.expected_parameters().detach())
    cut(lm, gates.binary_masks())
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, masked, rtol=1e-4, atol=1e-5)
    assert lm.model.config.hidden_size == 32 - 3
    assert expected == pytest.approx(decoder_parameters(lm.adapter), rel=1e-6)


@pytest.mark.parametrize("weights_lr", [0.0, 1e-3])
def test_weights_train_only_with_weights_lr(stories, stories_calib, weights_lr):
    """Sheared LLaMA trains the model with its masks (the reference's main-parameter
    group); weights_lr=0 keeps them frozen. Gates start clamped at ln 100."""
    embed = stories.adapter.embed.weight.detach().clone()
    config = ShearedLlama.Config(target="intermediate:160", steps=3, weights_lr=weights_lr)
    method = ShearedLlama(config)
    assert method.config.lr == 1.0
    method.run(stories, stories_calib[:4, :32], REQUEST)
    assert torch.equal(stories.adapter.embed.weight, embed) == (weights_lr == 0)
    assert float(method.gates.layers.log_alpha.detach().max()) <= math.log(100) + 1e-6


def test_folded_soft_gates_give_the_gated_model(stories):
    """LLM-Shearing's deterministic gates sigmoid(a / β · 0.8) on the kept structures,
    folded into the weights before the cut, give the model the hooks compute with those
    values; a block gate scales that block's o and down."""
    gates = ModelGates(stories.adapter)
    with torch.no_grad():
        for g in (*gates.kv, *gates.intermediate, gates.layers, gates.hidden):
            g.log_alpha.copy_(torch.linspace(-1.0, 4.0, g.log_alpha.numel()))
    target = {"kv": 3, "intermediate": 120, "hidden": 50}
    masks = gates.binary_masks(target)
    soft = gates.soft_values(masks)
    expected_kv = torch.sigmoid(gates.kv[0].log_alpha.detach() / BETA * 0.8) * masks["kv"][0]
    torch.testing.assert_close(soft["kv"][0], expected_kv)
    gates.values = {**soft, "layers": [torch.ones(())] * 5}
    with gates.attached(hidden=True):
        gated = _logits(stories.model)
    fold(stories.adapter, soft, list(target))
    cut(stories, masks)
    torch.testing.assert_close(_logits(stories.model), gated, rtol=1e-4, atol=1e-5)
    block = stories.adapter.blocks[1]
    o, down = (stories.adapter.linear(block, r).weight.detach().clone() for r in ("o", "down"))
    values = {"layers": [torch.tensor(0.7)] * len(stories.adapter.blocks)}
    fold(stories.adapter, values, ["layers"])
    torch.testing.assert_close(stories.adapter.linear(block, "o").weight, 0.7 * o)
    torch.testing.assert_close(stories.adapter.linear(block, "down").weight, 0.7 * down)


def test_folded_hidden_gates_with_an_untied_head():
    model = tiny_model("llama")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    lm = LoadedModel(model, tokenizer=None, adapter=adapter_for(model), source="llama")
    gates = ModelGates(lm.adapter)
    with torch.no_grad():
        for g in (*gates.kv, *gates.intermediate, gates.hidden):
            g.log_alpha.copy_(torch.linspace(-1.0, 4.0, g.log_alpha.numel()))
    masks = gates.binary_masks({"hidden": 20, "intermediate": 40})
    soft = gates.soft_values(masks)
    gates.values = {**soft, "kv": masks["kv"], "layers": [torch.ones(())] * 3}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with gates.attached(hidden=True), torch.no_grad():
        gated = lm.model(ids).logits
    fold(lm.adapter, soft, ["hidden", "intermediate"])
    cut(lm, masks)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, gated, rtol=1e-4, atol=1e-5)
