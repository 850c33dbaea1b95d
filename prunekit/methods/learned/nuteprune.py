"""NutePrune (Li et al., 2024, "NutePrune: Efficient Progressive Pruning with Numerous
Teachers for Large Language Models"): progressive structured pruning distilled from
teachers that are the same model under earlier, less sparse masks and LoRA states, so
memory holds one model.

The target rises linearly from the full widths to the final target over the first `ramp`
share of the steps, enforced by Sheared LLaMA's Lagrangian on per-block sparsities. Every
`teacher_every` steps the current test-time gates and masked-LoRA weights become the
teacher (the first teacher is the dense model); the loss is the KL divergence from the
teacher's next-token distribution to the student's, computed by swapping the teacher's
gates and LoRA weights in for one no-grad forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.methods.base import register
from prunekit.methods.learned.base import LearnedConfig
from prunekit.methods.learned.hard_concrete import ModelGates
from prunekit.methods.learned.sheared_llama import ShearedLlama


@dataclass
class NutePruneConfig(LearnedConfig):
    lora_rank: int = 8
    ramp: float = 0.5  # share of the steps over which the target tightens
    teacher_every: int = 10  # steps between teacher snapshots

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ramp <= 1 or self.teacher_every < 1:
            raise PrunekitError("ramp in (0, 1] and teacher_every >= 1")


@register
class NutePrune(ShearedLlama):
    name = "nuteprune"
    summary = "progressive hard-concrete masks distilled from the model's earlier states"
    Config = NutePruneConfig

    def setup(self, gates: ModelGates, target: dict[str, int]) -> dict[str, nn.Parameter]:
        self.teacher: dict | None = None
        return super().setup(gates, target)

    def warmup_steps(self) -> float:
        return self.config.ramp * self.config.steps

    def snapshot(self) -> dict:
        values = self.gates.deterministic_values()
        if self.teacher is None:  # the dense model: every gate open, LoRA at zero
            values = {k: [torch.ones_like(v) for v in vs] for k, vs in values.items()}
            return {"values": values, "lora": [torch.zeros_like(p) for p in self.lora]}
        return {"values": values, "lora": [p.detach().clone() for p in self.lora]}

    def task_loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        if self.teacher is None or step % self.config.teacher_every == 0:
            self.teacher = self.snapshot()
        own = self.gates.values
        for kind in self.full:
            if kind not in self.target:  # unconstrained kinds stay whole for the teacher too
                self.teacher["values"][kind] = own[kind]
        saved = [p.detach().clone() for p in self.lora]
        with torch.no_grad():
            self.gates.values = self.teacher["values"]
            for p, t in zip(self.lora, self.teacher["lora"], strict=True):
                p.copy_(t)
            teacher = model(input_ids=batch, use_cache=False).logits.float()
            for p, s in zip(self.lora, saved, strict=True):
                p.copy_(s)
        self.gates.values = own
        student = model(input_ids=batch, use_cache=False).logits.float()
        return F.kl_div(
            F.log_softmax(student, -1).flatten(0, 1),
            F.log_softmax(teacher, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
