"""The shared driver of learned structured pruning (Sheared LLaMA, Compresso, NutePrune).

A method trains hard-concrete gates (`hard_concrete.ModelGates`) over the constrained
kinds of structure on calibration windows, with whatever else it trains beside them
(masked LoRA), under its own constraint term (`constraint`) and loss (`task_loss`); then
each block keeps exactly the target's top structures by gate log-odds, a masked LoRA is
merged, and the surgery cuts the rest. The model weights stay frozen unless
`weights_lr` > 0 (Sheared LLaMA trains them with the masks).

The target shape is `--opt target=kv:2,intermediate:1024,layers:24,hidden:448` (any subset
of kinds; kv and intermediate per block, layers and hidden for the model); without it
`--sparsity` s gives kv and intermediate round((1 − s)·width) per block. Hidden targets
need an RMS pre-norm model, and give a model of uniform hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.engine.training import TrainSettings, train
from prunekit.errors import PrunekitError
from prunekit.eval.perplexity import next_token_loss
from prunekit.methods.base import Method, MethodConfig, PruneRequest
from prunekit.methods.learned.hard_concrete import KINDS, MODEL_WIDE, ModelGates
from prunekit.models.adapter import ModelAdapter
from prunekit.models.loading import LoadedModel
from prunekit.recovery.lora import add_masked_lora, merge_masked_lora, target_linears
from prunekit.surgery.depth import remove_blocks
from prunekit.surgery.residual import keep_hidden
from prunekit.surgery.width import (
    decoder_parameters,
    keep_channels,
    keep_heads,
    update_config_widths,
)


@dataclass
class LearnedConfig(MethodConfig):
    target: str = ""  # e.g. "kv:2,intermediate:1024,layers:24,hidden:448"
    steps: int = 100  # training steps (one calibration batch each, cycling)
    lr: float = 0.1  # gates (log-odds) and multipliers
    init_keep: float = 0.95  # initial P(gate != 0)
    lora_rank: int = 0  # masked LoRA on every linear, trained with the gates (0: none)
    lora_lr: float = 1e-4
    weights_lr: float = 0.0  # every model weight trained with the gates at this lr (0: frozen)
    fold_gates: bool = False  # scale kept structures by their deterministic gate values

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or not 0 < self.init_keep < 1 or self.lora_rank < 0:
            raise PrunekitError("steps >= 1, lr > 0, init_keep in (0, 1), lora_rank >= 0")
        if self.weights_lr < 0:
            raise PrunekitError(f"weights_lr must be >= 0, got {self.weights_lr}")


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


def widest(gates: ModelGates) -> dict[str, int]:
    """The narrowest block's KV groups and channels, the block count and the hidden size."""
    return {kind: min(widths) for kind, widths in gates.widths().items()}


def goal(kind: str, count: float, blocks: int) -> float:
    """A per-block target count as a model total (layers and hidden are already totals)."""
    return count if kind in MODEL_WIDE else count * blocks


@torch.no_grad()
def fold(adapter: ModelAdapter, values: dict[str, list[torch.Tensor]], kinds: list[str]) -> None:
    """Scale the weights by the gate `values` of `kinds` as LLM-Shearing's `prune_params`
    does before cutting: KV groups scale o's input columns, channels down's, a block's
    gate its o and down outputs, hidden gates the embedding columns, o / down output rows
    and every norm's scale; with a tied LM head the embedding's scaling reaches the head
    and the final norm is left as it is (the reference, untied, also scales the head's
    columns, which its code calls a bug; that is left out)."""

    def scale(module: nn.Module, factor: torch.Tensor, axis: int) -> None:
        weight = module.weight
        shape = [1, 1]
        shape[axis] = -1
        weight.mul_(factor.to(weight.dtype).view(shape) if factor.dim() else factor)
        if axis == 0 and getattr(module, "bias", None) is not None:
            module.bias.mul_(factor.to(module.bias.dtype))

    for i, block in enumerate(adapter.blocks):
        o, down = adapter.linear(block, "o"), adapter.linear(block, "down")
        if "kv" in kinds:
            scale(o, values["kv"][i].repeat_interleave(adapter.group_width), 1)
        if "intermediate" in kinds:
            scale(down, values["intermediate"][i], 1)
        if "layers" in kinds:
            scale(o, values["layers"][i], 0)
            scale(down, values["layers"][i], 0)
        if "hidden" in kinds:
            z = values["hidden"][0]
            scale(o, z, 0)
            scale(down, z, 0)
            for role in adapter.spec.norms:
                _scale_norm(adapter, adapter.norm(block, role), z)
    if "hidden" in kinds:
        z = values["hidden"][0]
        adapter.embed.weight.mul_(z.to(adapter.embed.weight.dtype))
        if adapter.lm_head.weight is not adapter.embed.weight:  # a tied head took z already
            _scale_norm(adapter, adapter.final_norm, z)


def _scale_norm(adapter: ModelAdapter, norm: nn.Module, z: torch.Tensor) -> None:
    """Make an RMS norm's output scale (w, or 1 + w for Gemma's offset norms) times `z`."""
    scale = adapter.norm_scale(norm) * z
    offset = adapter.spec.norm_kind == "rms_offset"
    norm.weight.copy_((scale - 1 if offset else scale).to(norm.weight.dtype))


def cut(lm: LoadedModel, masks: dict) -> None:
    """Keep the selected hidden dimensions, each block's selected KV groups and channels,
    then the selected blocks (`masks` as `ModelGates.binary_masks` gives them)."""
    adapter = lm.adapter
    if not masks["hidden"][0].all():
        keep_hidden(adapter, masks["hidden"][0].nonzero().flatten().tolist())
    for i, block in enumerate(adapter.blocks):
        if not masks["kv"][i].all():
            keep_heads(adapter, block, masks["kv"][i].nonzero().flatten().tolist())
        if not masks["intermediate"][i].all():
            keep_channels(adapter, block, masks["intermediate"][i].nonzero().flatten().tolist())
    update_config_widths(adapter)
    dropped = [i for i, keep in enumerate(masks["layers"]) if not keep]
    if dropped:
        remove_blocks(adapter, dropped)


class LearnedMaskMethod(Method):
    """Base of the learned-mask methods: implement `constraint` (and optionally
    `setup`, `task_loss`, `prepare_batches`)."""

    kind = "structured"
    supports_nm = False
    sparsity_meaning = "without --opt target: share of KV groups and MLP channels removed"
    no_allocation = "the target shape fixes every block"
    Config = LearnedConfig

    def setup(self, gates: ModelGates, target: dict[str, int]) -> dict[str, nn.Parameter]:
        """Extra trainable parameters of the constraint (e.g. Lagrange multipliers)."""
        return {}

    def constraint(self, gates: ModelGates, target: dict[str, int], step: int) -> torch.Tensor:
        raise NotImplementedError

    def task_loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        return next_token_loss(model(input_ids=batch, use_cache=False).logits, batch)

    def prepare_batches(self, lm: LoadedModel, calib: torch.Tensor, batch_size: int) -> list:
        return list(calib.split(batch_size))

    def run(self, lm: LoadedModel, calib: torch.Tensor | None, request: PruneRequest) -> dict:
        config, adapter, model = self.config, lm.adapter, lm.model
        gates = ModelGates(adapter, config.init_keep)
        target = parse_target(config.target) or uniform_target(gates, request.sparsity)
        for kind, count in target.items():
            if count > widest(gates)[kind]:
                raise PrunekitError(
                    f"target {kind}:{count} exceeds the model's {widest(gates)[kind]}"
                )
        self.gates, self.target = gates, target
        before = decoder_parameters(adapter)
        for param in model.parameters():
            param.requires_grad_(False)
        params = {
            f"gate.{name}": p
            for name, p in gates.named_parameters()
            if name.split(".")[0] in target
        }
        params |= self.setup(gates, target)
        linears = {}
        lrs = {}
        if config.lora_rank:
            linears = target_linears(adapter, list(adapter.spec.linears))
            lora = add_masked_lora(linears, config.lora_rank, 2.0 * config.lora_rank, request.seed)
            for i, p in enumerate(lora):
                params[f"lora.{i}"] = p
                lrs[f"lora.{i}"] = config.lora_lr
        self.lora = [params[k] for k in params if k.startswith("lora.")]
        if config.weights_lr > 0:
            for name, param in model.named_parameters():
                params[f"weight.{name}"] = param
                lrs[f"weight.{name}"] = config.weights_lr
        generator = torch.Generator().manual_seed(request.seed)
        batches = self.prepare_batches(lm, calib, request.batch_size)
        free = [kind for kind in KINDS if kind not in target]

        def loss_fn(step: int) -> torch.Tensor:
            gates.constrain()
            gates.draw(generator)
            for kind in free:  # unconstrained kinds stay whole
                gates.values[kind] = [torch.ones_like(v) for v in gates.values[kind]]
            batch = batches[step % len(batches)]
            return self.task_loss(model, batch, step) + self.constraint(gates, target, step)

        model.train()
        settings = TrainSettings(
            steps=config.steps, lr=config.lr, schedule="constant", grad_clip=0.0, save_every=0
        )
        with gates.attached(hidden="hidden" in target):
            tokens = request.batch_size * calib.shape[1]
            stats = train(params, loss_fn, settings, tokens, lrs=lrs, desc=self.name)
        model.eval()
        for param in params.values():
            param.requires_grad_(False)
        with torch.no_grad():
            expected = {k: float(v.sum()) for k, v in gates.expected_counts().items()}
        merge_masked_lora(linears)
        masks = gates.binary_masks(target)
        if config.fold_gates:
            fold(adapter, gates.soft_values(masks), list(target))
        cut(lm, masks)
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


def uniform_target(gates: ModelGates, sparsity: float) -> dict[str, int]:
    """kv and intermediate round((1 − sparsity)·width) per block (at least 1)."""
    most = widest(gates)
    return {
        "kv": max(round((1 - sparsity) * most["kv"]), 1),
        "intermediate": max(round((1 - sparsity) * most["intermediate"]), 1),
    }
