"""Heal a pruned model: train a few parameters (LoRA, masked LoRA, PERP subsets) or all
surviving weights (distillation) on text windows, keeping every pruned zero.

Methods (`method`):
- `lora`: peft LoRA on `targets`; merged with the mask re-applied (the merge changes the
  function slightly: `merge_loss_change` records how much) or saved unmerged (`merge=False`,
  an `adapter/` folder that `peft.PeftModel.from_pretrained` loads on the pruned model).
- `masked_lora`: PERP's MaskLoRA, `W + s·(BA) ⊙ M`; the merge is exact.
- `perp`: only the PERP subsets in `perp` (norms, biases, head, embed, lora).
- `distill`: all block linears, with pruned weights held at zero, on the KL to the dense
  `teacher`'s top-k distribution.
Any method takes a `teacher`: the loss is then distillation (plus `hidden_weight` × MSE
of matched block outputs); without one it is next-token cross-entropy.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit import settings
from prunekit.data import calibration_windows, load_text
from prunekit.engine.training import TrainSettings, train
from prunekit.errors import PrunekitError, choice_error
from prunekit.eval.perplexity import mean_nll, next_token_loss
from prunekit.export.folder import RECORD_FILE, check_output_dir, read_record, save_pruned
from prunekit.export.record import count_parameters, overall_sparsity
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel, load_model
from prunekit.process_memory import peak_rss_mb
from prunekit.recovery.lora import (
    add_masked_lora,
    add_peft_lora,
    merge_masked_lora,
    merge_peft_lora,
    target_linears,
)
from prunekit.recovery.mixture import DynamicMixture
from prunekit.recovery.perp import PERP_PARTS, perp_parameters
from prunekit.recovery.teacher import (
    block_outputs,
    cache_teacher,
    kd_loss,
    matched_blocks,
    read_batch,
)

METHODS = ("lora", "masked_lora", "perp", "distill")


@dataclass
class HealConfig:
    method: str = "lora"
    train: TrainSettings = field(default_factory=TrainSettings)
    data: str = "wikitext2"  # dataset name or text file; several: "wikitext2,ptb,FILE.txt"
    split: str | None = None  # default: the dataset's calibration split (never its test)
    batch_size: int = 8  # windows per step
    seqlen: int = 512
    seed: int = 0
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha (scale alpha / rank)
    dropout: float = 0.0  # LoRA dropout (peft LoRA only)
    targets: list[str] | None = None  # LoRA linears by role [default: every linear]
    merge: bool = True  # fold the adapters into the weights (lora: mask re-applied)
    perp: list[str] = field(default_factory=lambda: ["norms"])
    teacher: str | None = None  # dense model for distillation
    top_k: int = 64  # teacher logits kept per token
    temperature: float = 1.0
    hidden_weight: float = 0.0  # weight of the matched block-output MSE
    hidden_blocks: int = 4  # student blocks matched (evenly spaced, last included)
    dynamic_every: int = 0  # several sources: re-weight them every N steps (0: equal shares)
    reference_loss: list[float] | None = None  # per source [default: the teacher's]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise choice_error("heal method", self.method, METHODS)
        if self.method == "distill" and self.teacher is None:
            raise PrunekitError("heal method distill needs a teacher (the dense model)")
        bad = sorted(set(self.perp) - set(PERP_PARTS))
        if self.method == "perp" and (bad or not self.perp):
            raise PrunekitError(
                f"perp parts {', '.join(bad) or '(none)'} invalid; valid: {', '.join(PERP_PARTS)}"
            )
        if min(self.batch_size, self.rank, self.top_k, self.hidden_blocks) < 1 or self.seqlen < 2:
            raise PrunekitError("batch_size, rank, top_k, hidden_blocks >= 1 and seqlen >= 2")
        if self.temperature <= 0 or self.hidden_weight < 0 or not 0 <= self.dropout < 1:
            raise PrunekitError("temperature > 0, hidden_weight >= 0 and dropout in [0, 1)")
        sources = self.sources
        if len(sources) > 1 and self.method == "distill":
            raise PrunekitError(
                "distill trains on one source; several --data need lora, masked_lora or perp"
            )
        if self.dynamic_every < 0 or (self.dynamic_every and len(sources) < 2):
            raise PrunekitError("dynamic_every needs several --data sources and must be >= 0")
        if self.dynamic_every and self.reference_loss is None and self.teacher is None:
            raise PrunekitError(
                "dynamic batch loading needs reference losses: --reference-loss (one per "
                "source) or --teacher (the dense model's losses)"
            )
        if self.reference_loss is not None and len(self.reference_loss) != len(sources):
            raise PrunekitError(
                f"{len(self.reference_loss)} reference losses for {len(sources)} sources"
            )

    @property
    def sources(self) -> list[str]:
        return [s.strip() for s in self.data.split(",") if s.strip()]


@dataclass
class Healed:
    """The healed model, its peft wrapper when saved unmerged, and the stage's record."""

    lm: LoadedModel
    record: dict
    peft_model: nn.Module | None = None


def source_windows(lm: LoadedModel, config: HealConfig, source: str, count: int, seed: int):
    """`count` seeded random windows [count, seqlen] of one training source."""
    text = load_text(source, config.split, purpose="calib").text
    return calibration_windows(lm.tokenizer, text, count, config.seqlen, seed)


def training_batches(lm: LoadedModel, config: HealConfig) -> list[torch.Tensor]:
    """`steps` batches [batch_size, seqlen] of seeded random windows of the training text."""
    count = config.train.steps * config.batch_size
    windows = source_windows(lm, config, config.data, count, config.seed)
    return list(windows.split(config.batch_size))


def build_mixture(lm: LoadedModel, config: HealConfig) -> DynamicMixture:
    """Pools, held-out windows and reference losses of several sources."""
    count = config.train.steps * config.batch_size
    pools = [source_windows(lm, config, s, count, config.seed) for s in config.sources]
    held = [source_windows(lm, config, s, 4, config.seed + 1) for s in config.sources]
    reference = config.reference_loss
    if reference is None and config.dynamic_every:
        teacher = load_model(config.teacher, dtype="float32")
        reference = [mean_nll(teacher.model, h, config.batch_size) for h in held]
        del teacher
        gc.collect()
    every = config.dynamic_every or config.train.steps + 1  # 0: equal shares throughout
    return DynamicMixture(
        pools, held, reference or [0.0] * len(pools), config.batch_size, every, config.seed
    )


def _trainable(lm: LoadedModel, config: HealConfig) -> tuple[dict, nn.Module, list, dict]:
    """(parameters to train, module to run, LoRA-bearing linears, zero masks to hold)."""
    adapter, model = lm.adapter, lm.model
    roles = config.targets or list(adapter.spec.linears)
    linears = target_linears(adapter, roles)
    if config.method == "lora":
        peft_model = add_peft_lora(model, list(linears), config.rank, config.alpha, config.dropout)
        params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
        return params, peft_model, [], {}
    params: dict[str, nn.Parameter] = {}
    masked: dict[str, nn.Module] = {}
    if config.method == "masked_lora" or (config.method == "perp" and "lora" in config.perp):
        masked = linears
        lora = add_masked_lora(linears, config.rank, config.alpha, config.seed)
        params = {f"lora.{i}": p for i, p in enumerate(lora)}
    if config.method == "perp":
        params |= perp_parameters(model, [p for p in config.perp if p != "lora"])
    holds = {}
    if config.method == "distill":
        names = {id(m): n for n, m in model.named_modules()}
        for block in adapter.blocks:
            for module in adapter.linears(block).values():
                weight = module.weight
                params[names[id(module)] + ".weight"] = weight
                holds[names[id(module)]] = (weight, weight_matrix(module) == 0)
    return params, model, list(masked.values()), holds


def heal_model(
    lm: LoadedModel,
    config: HealConfig,
    checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    depth: tuple[list[int], int] | None = None,
) -> Healed:
    """Train `lm` in place as `config` says; checkpoints under `checkpoint` (resumed when
    present), the teacher cache under `cache_dir`. `depth` = (kept block indices, the
    teacher's block count) of a depth-pruned model matches blocks for the hidden loss."""
    began = time.perf_counter()
    mixture = build_mixture(lm, config) if len(config.sources) > 1 else None
    batches = training_batches(lm, config) if mixture is None else []
    sparsity_before = overall_sparsity(lm.adapter)
    for param in lm.model.parameters():
        param.requires_grad_(False)
    teacher_cache, student_blocks, teacher_of = None, [], {}
    if config.teacher is not None and mixture is None:
        num_student = len(lm.adapter.blocks)
        if config.hidden_weight > 0:
            step = max(num_student // config.hidden_blocks, 1)
            student_blocks = sorted(
                {
                    num_student - 1 - i * step
                    for i in range(config.hidden_blocks)
                    if num_student - 1 - i * step >= 0
                }
            )
        kept, num_teacher = depth if depth is not None else (None, num_student)
        matches = matched_blocks(kept, num_student, num_teacher)
        teacher_of = {s: matches[s] for s in student_blocks}
        teacher_cache = cache_teacher(
            config.teacher,
            batches,
            config.top_k,
            cache_dir or settings.cache_dir() / "teacher",
            sorted(set(teacher_of.values())),
        )
        gc.collect()
    params, runner, masked, holds = _trainable(lm, config)
    runner.train()
    hidden, remove_hooks = block_outputs(list(lm.adapter.blocks), student_blocks)

    def loss_fn(step: int) -> torch.Tensor:
        if mixture is not None:
            if step and step % mixture.every == 0:
                mixture.update(runner, config.batch_size)
            batch = mixture.batch()
        else:
            batch = batches[step]
        logits = runner(input_ids=batch, use_cache=False).logits
        if teacher_cache is None:
            return next_token_loss(logits, batch)
        target = read_batch(teacher_cache, step)
        loss = kd_loss(logits, target["values"], target["indices"], config.temperature)
        for s, t in teacher_of.items():
            loss = loss + config.hidden_weight * F.mse_loss(hidden[s].float(), target[f"block.{t}"])
        return loss

    def hold_zeros() -> None:
        with torch.no_grad():
            for weight, zeros in holds.values():
                weight.masked_fill_(zeros, 0.0)

    fingerprint = {"config": asdict(config), "source": lm.source, "params": sorted(params)}
    try:
        stats = train(
            params,
            loss_fn,
            config.train,
            config.batch_size * config.seqlen,
            checkpoint,
            fingerprint,
            hold_zeros if holds else None,
            extra=(mixture.state, mixture.restore) if mixture is not None else None,
        )
    finally:
        remove_hooks()
    runner.eval()
    for param in params.values():
        param.requires_grad_(False)
    peft_model, facts = None, {}
    if config.method == "lora":
        if config.merge:
            probe = batches[-1] if batches else mixture.held_out[0]
            facts["merge_loss_change"] = _merge_cost(runner, probe)
            lm.model = merge_peft_lora(runner, keep_mask=True)
        else:
            peft_model = runner
    elif masked and config.merge:
        merge_masked_lora({str(i): m for i, m in enumerate(masked)})
    elif masked:
        raise PrunekitError("masked LoRA is saved merged (peft cannot hold its mask)")
    losses = stats["losses"]
    tail = losses[-max(len(losses) // 10, 1) :]
    record = {
        "stage": "heal",
        "method": config.method,
        "config": asdict(config),
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "parameters_after": count_parameters(lm.model),
        "sparsity_before": round(sparsity_before, 6),
        "sparsity_after": round(overall_sparsity(lm.adapter), 6) if peft_model is None else None,
        "first_loss": round(losses[0], 6) if stats["resumed_from"] == 0 else None,
        "final_loss": round(sum(tail) / len(tail), 6),
        "resumed_from_step": stats["resumed_from"],
        "seconds_per_step": round(stats["seconds"] / max(stats["steps_run"], 1), 4),
        "wall_time_s": round(time.perf_counter() - began, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **facts,
        **({"source_weights": mixture.history} if mixture is not None else {}),
    }
    return Healed(lm, record, peft_model)


def _merge_cost(peft_model: nn.Module, batch: torch.Tensor) -> float:
    """Relative change of the loss on `batch` from merging with the mask re-applied:
    (merged − unmerged) / unmerged, measured on a copy of the adapters' effect."""
    with torch.no_grad():
        unmerged = float(next_token_loss(peft_model(input_ids=batch).logits, batch))
        originals = {}
        for name, module in peft_model.named_modules():
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(module, "get_delta_weight"):
                delta = module.get_delta_weight("default")
                originals[name] = base.weight.detach().clone()
                base.weight.add_(delta.masked_fill(base.weight == 0, 0.0).to(base.weight.dtype))
        with peft_model.disable_adapter():
            merged = float(next_token_loss(peft_model(input_ids=batch).logits, batch))
        modules = dict(peft_model.named_modules())
        for name, weight in originals.items():
            modules[name].base_layer.weight.copy_(weight)
    return round((merged - unmerged) / unmerged, 6)


def heal(
    model_dir: str | Path,
    out: str | Path,
    config: HealConfig | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Heal the model folder `model_dir` and write it to `out` (atomically) with its
    prunekit.json extended by this stage; options are HealConfig fields (and
    TrainSettings fields: steps, lr, schedule, ...). Returns the written record."""
    out = check_output_dir(out, overwrite)
    config = config or make_config(**options)
    folder = Path(model_dir)
    record = (
        read_record(folder)
        if (folder / RECORD_FILE).is_file()
        else {"source_model": str(model_dir)}
    )
    if config.method == "distill" and config.teacher is None:
        config.teacher = record["source_model"]
    lm = load_model(str(model_dir), dtype="float32")
    details = record.get("details") or {}
    depth = None
    if "kept_blocks" in details:
        depth = (details["kept_blocks"], details["num_blocks_before"])
    work = out.with_name(f".{out.name}.heal")
    healed = heal_model(lm, config, work / "checkpoint", work / "teacher", depth)
    record = {**record, "healing": [*record.get("healing", []), healed.record]}
    extra = None
    if healed.peft_model is not None:
        staged = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out.parent))
        healed.peft_model.save_pretrained(staged)
        lm.model = healed.peft_model.unload()
        extra = lambda tmp: shutil.move(str(staged), str(tmp / "adapter"))  # noqa: E731
    save_pruned(lm, out, record, overwrite, extra)
    shutil.rmtree(work, ignore_errors=True)
    return record


def make_config(**options) -> HealConfig:
    """A HealConfig from flat options (TrainSettings fields go to `train`)."""
    train_keys = set(TrainSettings.__dataclass_fields__)
    heal_keys = set(HealConfig.__dataclass_fields__) - {"train"}
    unknown = sorted(set(options) - train_keys - heal_keys)
    if unknown:
        valid = ", ".join(sorted(train_keys | heal_keys))
        raise PrunekitError(f"unknown heal option {', '.join(unknown)}; valid: {valid}")
    settings = TrainSettings(**{k: v for k, v in options.items() if k in train_keys})
    return HealConfig(train=settings, **{k: v for k, v in options.items() if k in heal_keys})
