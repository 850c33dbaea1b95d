"""Compresso (Guo et al., 2023, "Compresso: Structured Pruning with Collaborative
Prompting Learns Compact Large Language Models"): hard-concrete structure masks trained
jointly with LoRA, the sparsity driven by an L0 penalty, and optionally a collaborative
prompt that tells the model it is being pruned.

Here: masked LoRA (rank `lora_rank`, merged exactly at the end) on every linear, and the
penalty w(t)·Σₖ((Eₖ − Tₖ)/Tₖ)² on the expected kept counts, its weight w rising linearly
from 0 to `penalty` over the first `warmup` share of the steps. `prompt` is tokenised and
prepended to every training window (the loss skips its tokens); it is recorded, and
evaluating the pruned model with the same prompt is up to the caller (it only makes sense
for instruction-tuned models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.eval.perplexity import next_token_loss
from prunekit.methods.base import register
from prunekit.methods.learned.base import (
    LearnedConfig,
    LearnedMaskMethod,
    goal,
)
from prunekit.methods.learned.hard_concrete import ModelGates
from prunekit.models.loading import LoadedModel

COLLABORATIVE_PROMPT = (
    "Attention! LLM, you are undergoing optimization with a pruning algorithm to boost "
    "efficiency by removing redundant parameters. Please do your best to keep your ability."
)


@dataclass
class CompressoConfig(LearnedConfig):
    lora_rank: int = 8
    penalty: float = 10.0  # final weight of the L0 penalty
    warmup: float = 0.5  # share of the steps over which the penalty weight rises
    prompt: str = ""  # collaborative prompt ("default": the paper's)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.penalty <= 0 or not 0 < self.warmup <= 1:
            raise PrunekitError("penalty > 0 and warmup in (0, 1]")


def l0_penalty(gates: ModelGates, target: dict[str, int], weight: float) -> torch.Tensor:
    """weight·Σₖ((Eₖ − Tₖ)/Tₖ)² over the constrained kinds (totals over blocks)."""
    counts, blocks = gates.expected_counts(), len(gates.kv)
    total = torch.zeros(())
    for kind, count in target.items():
        aim = goal(kind, count, blocks)
        total = total + ((counts[kind].sum() - aim) / aim) ** 2
    return weight * total


@register
class Compresso(LearnedMaskMethod):
    name = "compresso"
    summary = "hard-concrete masks + LoRA under an L0 penalty, optional collaborative prompt"
    Config = CompressoConfig

    def prepare_batches(self, lm: LoadedModel, calib: torch.Tensor, batch_size: int) -> list:
        text = COLLABORATIVE_PROMPT if self.config.prompt == "default" else self.config.prompt
        self.prompt_len = 0
        if not text:
            return list(calib.split(batch_size))
        ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() >= calib.shape[1]:
            raise PrunekitError(
                f"the prompt has {ids.numel()} tokens, not fewer than --seqlen {calib.shape[1]}"
            )
        self.prompt_len = ids.numel()
        body = calib[:, : calib.shape[1] - ids.numel()]
        joined = torch.cat([ids.expand(body.shape[0], -1), body], dim=1)
        return list(joined.split(batch_size))

    def task_loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        logits = model(input_ids=batch, use_cache=False).logits
        skip = max(self.prompt_len - 1, 0)
        return next_token_loss(logits[:, skip:], batch[:, skip:])

    def constraint(self, gates: ModelGates, target: dict[str, int], step: int) -> torch.Tensor:
        ramp = max(self.config.warmup * self.config.steps, 1.0)
        return l0_penalty(gates, target, self.config.penalty * min(1.0, (step + 1) / ramp))
