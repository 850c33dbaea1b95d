"""Healing: zeros and N:M groups survive every merge, masked LoRA merges exactly, peft
adapters reload, PERP trains only its subset, distillation's loss and block matching,
an interrupted run resumes to the same weights, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.data import load_text
from prunekit.engine.training import HealInterrupted
from prunekit.recovery import heal as heal_folder
from prunekit.recovery import heal_model, healing, make_config
from prunekit.recovery.teacher import kd_loss, matched_blocks


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("heal") / "train.txt"
    path.write_text(load_text("tinyshakespeare", purpose="calib").text[:20000])
    return str(path)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, text_file) -> str:
    """stories260K pruned by Wanda 2:4, saved."""
    lm = prunekit.load_model("stories260k")
    record = prunekit.prune(lm, "wanda", pattern="2:4", calib=text_file, nsamples=4, seqlen=64)
    out = tmp_path_factory.mktemp("pruned") / "wanda24"
    prunekit.save(lm, out, record)
    return str(out)


def _config(text_file, **options):
    base = {"steps": 4, "batch_size": 2, "seqlen": 32, "lr": 1e-2, "data": text_file}
    return make_config(**{**base, **options})


def _weights(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _check_two_four(lm) -> None:
    for block in lm.adapter.blocks:
        for module in lm.adapter.linears(block).values():
            groups = (module.weight != 0).reshape(-1, 4).sum(1)
            assert (groups <= 2).all()


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_masked_lora_merge_is_exact_and_keeps_zeros(pruned_dir, text_file):
    lm = prunekit.load_pruned(pruned_dir, dtype="float32")
    zeros = {n: p == 0 for n, p in _weights(lm).items()}
    config = _config(text_file, method="masked_lora", merge=False)
    with pytest.raises(prunekit.PrunekitError, match="saved merged"):
        heal_model(lm, config)
    lm = prunekit.load_pruned(pruned_dir, dtype="float32")
    from prunekit.recovery.healing import _trainable

    params, runner, masked, _ = _trainable(lm, _config(text_file, method="masked_lora"))
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.05)  # a nonzero update everywhere
    trained = _logits(lm, IDS)
    from prunekit.recovery.lora import merge_masked_lora

    merge_masked_lora({str(i): m for i, m in enumerate(masked)})
    torch.testing.assert_close(_logits(lm, IDS), trained, rtol=1e-5, atol=1e-6)
    after = _weights(lm)
    changed = False
    for name, mask in zeros.items():
        assert (after[name][mask] == 0).all(), name
        changed |= not torch.equal(
            after[name], prunekit.load_pruned(pruned_dir).model.state_dict()[name]
        )
    assert changed
    _check_two_four(lm)


def test_heal_masked_lora_lowers_the_loss_and_keeps_sparsity(pruned_dir, text_file):
    lm = prunekit.load_pruned(pruned_dir, dtype="float32")
    healed = heal_model(lm, _config(text_file, method="masked_lora", steps=8))
    record = healed.record
    assert record["final_loss"] < record["first_loss"]
    assert record["sparsity_after"] == record["sparsity_before"] > 0.49
    _check_two_four(lm)


def test_peft_lora_merge_keeps_every_zero_and_states_its_cost(pruned_dir, text_file):
    lm = prunekit.load_pruned(pruned_dir, dtype="float32")
    zeros = {n: p == 0 for n, p in _weights(lm).items()}
    healed = heal_model(lm, _config(text_file, method="lora"))
    merged = dict(healed.lm.model.named_parameters())
    for name, mask in zeros.items():
        assert (merged[name].detach()[mask] == 0).all(), name
    _check_two_four(healed.lm)
    assert healed.record["sparsity_after"] == healed.record["sparsity_before"]
    assert "merge_loss_change" in healed.record


def test_unmerged_adapter_reloads_with_peft(pruned_dir, text_file, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "healed"
    record = heal_folder(pruned_dir, out, _config(text_file, method="lora", merge=False))
    assert record["healing"][-1]["method"] == "lora"
    assert json.loads((out / "prunekit.json").read_text())["method"] == "wanda"
    base = prunekit.load_pruned(out, dtype="float32")
    assert torch.equal(_logits(base, IDS), _logits(prunekit.load_pruned(pruned_dir), IDS))
    model = peft.PeftModel.from_pretrained(base.model, out / "adapter")
    with torch.no_grad():
        adapted = model(IDS).logits
    assert not torch.allclose(adapted, _logits(prunekit.load_pruned(pruned_dir), IDS))
    assert not (out.parent / ".healed.heal").exists()


def test_perp_trains_only_its_parameters(pruned_dir, text_file):
    lm = prunekit.load_pruned(pruned_dir, dtype="float32")
    before = _weights(lm)
    healed = heal_model(lm, _config(text_file, method="perp", perp=["norms"]))
    after = _weights(healed.lm)
    for name in before:
        is_norm = "norm" in name
        assert torch.equal(before[name], after[name]) != is_norm, name
    assert healed.record["trainable_parameters"] == sum(
        v.numel() for n, v in before.items() if "norm" in n
    )
    with pytest.raises(prunekit.PrunekitError, match="no such parameters"):
        heal_model(
            prunekit.load_pruned(pruned_dir), _config(text_file, method="perp", perp=["biases"])
        )


def test_kd_loss_is_the_top_k_kl_times_t_squared():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 50, generator=gen)
    teacher = torch.randn(2, 5, 50, generator=gen)
    values, indices = teacher.topk(8, dim=-1)
    t = 2.0
    expected = 0.0
    for b in range(2):
        for pos in range(5):
            p = torch.softmax(values[b, pos] / t, 0)
            q = torch.log_softmax(student[b, pos] / t, 0)[indices[b, pos]]
            expected += float((p * (p.log() - q)).sum())
    expected = expected / 10 * t * t
    assert float(kd_loss(student, values, indices, t)) == pytest.approx(expected, rel=1e-5)
    full_values, full_indices = teacher.topk(50, dim=-1)  # all tokens: the full KL
    full = (
        F.kl_div(
            torch.log_softmax(student, -1),
            torch.log_softmax(teacher, -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .mean()
    )
    assert float(kd_loss(student, full_values, full_indices, 1.0)) == pytest.approx(
        float(full), rel=1e-5
    )


def test_depth_pruned_blocks_match_the_last_teacher_block_they_replace():
    assert matched_blocks(None, 4, 4) == [0, 1, 2, 3]
    # teacher blocks 0..7, blocks 2, 3 and 7 removed: student block 1 replaced 1..3
    assert matched_blocks([0, 1, 4, 5, 6], 5, 8) == [0, 3, 4, 5, 7]


def test_distill_holds_zeros_and_uses_the_teacher(pruned_dir, text_file, tmp_path):
    lm = prunekit.load_pruned(pruned_dir, dtype="float32")
    zeros = {n: p == 0 for n, p in _weights(lm).items()}
    config = _config(text_file, method="distill", teacher="stories260k", hidden_weight=0.1)
    healed = heal_model(lm, config, cache_dir=tmp_path / "teacher")
    after = _weights(healed.lm)
    for name, mask in zeros.items():
        assert (after[name][mask] == 0).all(), name
    assert healed.record["sparsity_after"] == healed.record["sparsity_before"]
    files = sorted((tmp_path / "teacher").glob("*/*.safetensors"))
    assert len(files) == 4  # one per step, computed once


def _interrupt_at_fourth_step(monkeypatch):
    """Make the 4th training step raise Ctrl-C; returns the real loss to restore."""
    real, calls = healing.next_token_loss, {"n": 0}

    def flaky(logits, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(logits, batch)

    monkeypatch.setattr(healing, "next_token_loss", flaky)
    return real


def test_interrupted_heal_resumes_to_the_same_weights(pruned_dir, text_file, tmp_path, monkeypatch):
    config = _config(text_file, method="masked_lora", steps=6, save_every=2)
    straight = heal_model(prunekit.load_pruned(pruned_dir, dtype="float32"), config)

    real = _interrupt_at_fourth_step(monkeypatch)
    with pytest.raises(HealInterrupted, match="checkpoint at step 3"):
        heal_model(prunekit.load_pruned(pruned_dir, dtype="float32"), config, tmp_path / "ckpt")
    monkeypatch.setattr(healing, "next_token_loss", real)
    resumed = heal_model(
        prunekit.load_pruned(pruned_dir, dtype="float32"), config, tmp_path / "ckpt"
    )
    assert resumed.record["resumed_from_step"] == 3
    a, b = _weights(straight.lm), _weights(resumed.lm)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "prunekit", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_heal_writes_a_model_and_rejects_bad_input(pruned_dir, text_file, tmp_path):
    out = tmp_path / "healed"
    done = _cli(
        "heal",
        pruned_dir,
        "--out",
        str(out),
        "--method",
        "masked_lora",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seqlen",
        "32",
        "--data",
        text_file,
    )
    assert done.returncode == 0, done.stderr
    assert "sparsity 0.5" in done.stdout
    stage = json.loads((out / "prunekit.json").read_text())["healing"][0]
    assert stage["method"] == "masked_lora" and stage["sparsity_after"] == stage["sparsity_before"]
    bad = _cli("heal", pruned_dir, "--out", str(tmp_path / "x"), "--method", "nosuch")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().count("\n") == 0
        and "valid: lora, masked_lora, perp, distill" in bad.stderr
    )
    assert not (tmp_path / "x").exists()


def test_dynamic_mixture_reweights_by_loss_gap():
    from prunekit.recovery.mixture import DynamicMixture

    class Fixed(torch.nn.Module):
        """A "model" whose loss on source i is i + 1 nats (via the held-out windows)."""

    pools = [torch.full((4, 8), i, dtype=torch.long) for i in range(3)]
    mixture = DynamicMixture(pools, [p[:1] for p in pools], [1.0, 1.0, 1.0], 6, 2, 0)
    import prunekit.recovery.mixture as mod

    real = mod.mean_nll
    mod.mean_nll = lambda model, held, batch: float(held[0, 0]) + 1.0
    try:
        losses = mixture.update(torch.nn.Linear(1, 1), 2)
    finally:
        mod.mean_nll = real
    assert losses == [1.0, 2.0, 3.0]
    w = torch.tensor([1.0, math.e, math.e**2])  # exp(max(loss - ref, 0))
    torch.testing.assert_close(mixture.weights, (w / w.sum()).double())
    batch = mixture.batch()
    assert batch.shape == (6, 8) and set(batch[:, 0].tolist()) <= {0, 1, 2}
    state = mixture.state()
    again = [mixture.batch() for _ in range(3)]
    mixture.restore(state)
    assert all(torch.equal(a, mixture.batch()) for a in again)


def test_heal_on_several_sources_with_dynamic_loading_resumes_identically(
    pruned_dir, text_file, tmp_path, monkeypatch
):
    other = tmp_path / "other.txt"
    other.write_text(load_text("tinystories", purpose="calib").text[:20000])
    options = dict(
        method="masked_lora", steps=6, save_every=2, data=f"{text_file},{other}",
        dynamic_every=2, reference_loss=[3.0, 2.0],
    )  # fmt: skip
    config = _config(text_file, **options)
    straight = heal_model(prunekit.load_pruned(pruned_dir, dtype="float32"), config)
    weights = straight.record["source_weights"]
    assert len(weights) == 3 and weights[0] == [0.5, 0.5] and weights[-1] != [0.5, 0.5]
    real = _interrupt_at_fourth_step(monkeypatch)
    with pytest.raises(HealInterrupted):
        heal_model(prunekit.load_pruned(pruned_dir, dtype="float32"), config, tmp_path / "ck")
    monkeypatch.setattr(healing, "next_token_loss", real)
    resumed = heal_model(prunekit.load_pruned(pruned_dir, dtype="float32"), config, tmp_path / "ck")
    assert resumed.record["source_weights"] == weights
    a, b = _weights(straight.lm), _weights(resumed.lm)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_dynamic_loading_needs_reference_losses(text_file):
    with pytest.raises(prunekit.PrunekitError, match="needs reference losses"):
        _config(text_file, data=f"{text_file},{text_file}", dynamic_every=2)


def test_peft_lora_on_several_sources_merges_with_the_mask(pruned_dir, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(load_text("tinystories", purpose="calib").text[:20000])
    config = _config(text_file, method="lora", steps=2, data=f"{text_file},{other}")
    healed = heal_model(prunekit.load_pruned(pruned_dir, dtype="float32"), config)
    assert healed.record["sparsity_after"] == healed.record["sparsity_before"]
    assert healed.record["source_weights"] == [[0.5, 0.5]]
    assert "merge_loss_change" in healed.record
