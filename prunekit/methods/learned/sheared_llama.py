"""Sheared LLaMA (Xia et al., ICLR 2024, "Sheared LLaMA: Accelerating Language Model
Pre-training via Structured Pruning"): targeted structured pruning to a given shape by
learning hard-concrete masks under Lagrange multipliers (princeton-nlp/LLM-Shearing).

The gates (`hard_concrete.ModelGates`: KV groups, MLP channels, blocks) are trained on the
language-modelling loss of the gated model plus, per constrained kind k,
λ₁ₖ·(Eₖ − Tₖ) + λ₂ₖ·(Eₖ − Tₖ)², where Eₖ is the expected kept count (summed over blocks)
and Tₖ the target's. The multipliers are maximised while the gates are minimised (the
reference steps them with a negated learning rate; here their gradient is negated).
At the end each block keeps exactly its target's top structures by gate log-odds and the
surgery cuts the rest. The model weights are frozen unless `train_weights=true`; continued
pre-training is a separate `prunekit heal` stage.

`--opt target=kv:2,intermediate:1024,layers:24` names the shape (any subset of kinds);
without it, `--sparsity` s gives kv and intermediate round((1 − s)·width) per block.
Hidden-dimension masks are not learned here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.engine.training import TrainSettings, train
from prunekit.errors import PrunekitError
from prunekit.methods.base import Method, MethodConfig, PruneRequest, register
from prunekit.methods.learned.hard_concrete import KINDS, ModelGates
from prunekit.models.loading import LoadedModel
from prunekit.surgery.depth import remove_blocks
from prunekit.surgery.width import (
    decoder_parameters,
    keep_channels,
    keep_heads,
    update_config_widths,
)


@dataclass
class ShearedConfig(MethodConfig):
    target: str = ""  # e.g. "kv:2,intermediate:1024,layers:24"
    steps: int = 100  # mask-learning steps
    lr: float = 0.1  # gates (log-odds) and multipliers
    weights_lr: float = 1e-4  # model weights, with train_weights
    train_weights: bool = False
    init_keep: float = 0.95  # initial P(gate != 0)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or not 0 < self.init_keep < 1:
            raise PrunekitError("steps >= 1, lr > 0 and init_keep in (0, 1)")


def parse_target(text: str) -> dict[str, int]:
    """`"kv:2,intermediate:1024"` -> {"kv": 2, "intermediate": 1024}."""
    target = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, value = part.partition(":")
        if kind not in KINDS or not value.isdigit() or int(value) < 1:
            raise PrunekitError(
                f"target entry {part!r} invalid; valid: {', '.join(KINDS)} with a count >= 1"
            )
        target[kind] = int(value)
    return target


def check_target(target: dict[str, int], gates: ModelGates) -> None:
    widest = {
        "kv": min(len(g.log_alpha) for g in gates.kv),
        "intermediate": min(len(g.log_alpha) for g in gates.intermediate),
        "layers": len(gates.layers.log_alpha),
    }
    for kind, count in target.items():
        if count > widest[kind]:
            raise PrunekitError(f"target {kind}:{count} exceeds the model's {widest[kind]}")


def lagrangian(
    gates: ModelGates, target: dict[str, int], multipliers: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σₖ λ₁ₖ·(Eₖ − Tₖ) + λ₂ₖ·(Eₖ − Tₖ)² over the constrained kinds (totals over blocks)."""
    counts, blocks = gates.expected_counts(), len(gates.kv)
    total = torch.zeros(())
    for kind, count in target.items():
        goal = count if kind == "layers" else count * blocks
        gap = counts[kind].sum() - goal
        lam = multipliers[kind]
        total = total + lam[0] * gap + lam[1] * gap * gap
    return total


@register
class ShearedLlama(Method):
    name = "sheared_llama"
    summary = "hard-concrete masks trained to a target shape under Lagrange multipliers"
    kind = "structured"
    supports_nm = False
    sparsity_meaning = "without --opt target: share of KV groups and MLP channels removed"
    no_allocation = "sheared_llama's target shape fixes every block"
    Config = ShearedConfig

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        config, adapter, model = self.config, lm.adapter, lm.model
        gates = ModelGates(adapter, config.init_keep)
        target = parse_target(config.target) or self.uniform_target(gates, request.sparsity)
        check_target(target, gates)
        before = decoder_parameters(adapter)
        for param in model.parameters():
            param.requires_grad_(False)
        params = {f"gate.{n}": p for n, p in gates.named_parameters()}
        multipliers = {}
        for kind in target:  # fixed kinds keep their gates at exactly 1
            multipliers[kind] = torch.zeros(2, requires_grad=True)
            multipliers[kind].register_hook(torch.neg)  # gradient ascent on λ
            params[f"lambda.{kind}"] = multipliers[kind]
        for kind in set(KINDS) - set(target):
            for p in gates.named_parameters():
                if p[0].startswith(kind):
                    params.pop(f"gate.{p[0]}")
        if config.train_weights:
            params |= {f"model.{n}": p for n, p in model.named_parameters()}
        generator = torch.Generator().manual_seed(request.seed)
        batches = calib.split(request.batch_size)
        free = set(KINDS) - set(target)

        def loss_fn(step: int) -> torch.Tensor:
            gates.draw(generator)
            for kind in free:
                gates.values[kind] = [torch.ones_like(v) for v in gates.values[kind]]
            batch = batches[step % len(batches)]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            lm_loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), batch[:, 1:].flatten()
            )
            return lm_loss + lagrangian(gates, target, multipliers)

        model.train()
        with gates.attached():
            stats = train(
                params,
                loss_fn,
                TrainSettings(steps=config.steps, lr=config.lr, schedule="constant", grad_clip=0.0),
                request.batch_size * calib.shape[1],
            )
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        expected = {k: v.detach().sum().item() for k, v in gates.expected_counts().items()}
        self.cut(lm, gates.binary_masks(target))
        after = decoder_parameters(adapter)
        return {
            "target": target,
            "expected_counts_at_end": {k: round(v, 3) for k, v in expected.items()},
            "first_loss": round(stats["losses"][0], 6),
            "final_loss": round(stats["losses"][-1], 6),
            "decoder_parameters_before": before,
            "decoder_parameters_after": after,
            "decoder_share_removed": round(1 - after / before, 6),
        }

    @staticmethod
    def uniform_target(gates: ModelGates, sparsity: float) -> dict[str, int]:
        kv = min(len(g.log_alpha) for g in gates.kv)
        channels = min(len(g.log_alpha) for g in gates.intermediate)
        return {
            "kv": max(round((1 - sparsity) * kv), 1),
            "intermediate": max(round((1 - sparsity) * channels), 1),
        }

    @staticmethod
    def cut(lm: LoadedModel, masks: dict) -> None:
        """Keep each block's selected KV groups and channels, then the selected blocks
        (`masks` as `ModelGates.binary_masks` gives them)."""
        adapter = lm.adapter
        for i, block in enumerate(adapter.blocks):
            if not masks["kv"][i].all():
                keep_heads(adapter, block, masks["kv"][i].nonzero().flatten().tolist())
            if not masks["intermediate"][i].all():
                kept = masks["intermediate"][i].nonzero().flatten().tolist()
                keep_channels(adapter, block, kept)
        update_config_widths(adapter)
        dropped = [i for i, keep in enumerate(masks["layers"]) if not keep]
        if dropped:
            remove_blocks(adapter, dropped)
