"""The Python API: `load_model`, `prune`, `evaluate`, `save`. The CLI is a thin layer on it."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from prunekit.allocation import allocate
from prunekit.data import DATASETS, calibration_windows, check_dataset, load_text
from prunekit.engine.runner import PROPAGATION
from prunekit.errors import PrunekitError, choice_error
from prunekit.eval.perplexity import perplexity
from prunekit.eval.tasks import TASKS, canonical_task
from prunekit.eval.zeroshot import evaluate_tasks
from prunekit.export import save_pruned
from prunekit.masks import SCOPES, Pattern, check_sparsity
from prunekit.methods import Method, MethodConfig, PruneRequest, get_method
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import LoadedModel, load_model
from prunekit.record import (
    PruneRecord,
    count_parameters,
    layer_sparsity,
    overall_sparsity,
    peak_rss_mb,
)

__all__ = [
    "check_evaluation_name",
    "evaluate",
    "is_zeroshot_task",
    "load_model",
    "plan_prune",
    "prune",
    "save",
]


def _check_seqlen(lm: LoadedModel, seqlen: int) -> None:
    limit = lm.adapter.max_context
    if limit is not None and seqlen > limit:
        raise PrunekitError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens")
    if seqlen < 2:
        raise PrunekitError(f"seqlen must be at least 2, got {seqlen}")


def _check_nm_shapes(lm: LoadedModel, pattern: Pattern) -> None:
    for block in lm.adapter.blocks:
        for path, module in lm.adapter.linears(block).items():
            in_features = weight_matrix(module).shape[1]
            if in_features % pattern.m:
                raise PrunekitError(
                    f"pattern {pattern} needs every layer's input width divisible by "
                    f"{pattern.m}; {path} has {in_features}"
                )


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """A validated pruning request, checked before any model is loaded."""

    method: type[Method]
    config: MethodConfig
    pattern: Pattern
    sparsity: float


def plan_prune(
    method: str,
    sparsity: float | None,
    pattern: str = "unstructured",
    scope: str = "row",
    nsamples: int = 64,
    calib: str = "wikitext2",
    options: dict[str, Any] | None = None,
    propagate: str = "pruned",
) -> PrunePlan:
    """Check everything about a request that does not need the model; one-line errors."""
    method_cls = get_method(method)
    config = method_cls.Config.from_options(options or {})
    parsed = Pattern.parse(pattern)
    if parsed.is_nm:
        if not method_cls.supports_nm:
            raise PrunekitError(f"method {method!r} does not support N:M patterns")
        if sparsity is not None and abs(sparsity - parsed.sparsity) > 1e-9:
            raise PrunekitError(
                f"sparsity {sparsity} conflicts with pattern {pattern} "
                f"(which keeps {parsed.n} of {parsed.m}, i.e. sparsity {parsed.sparsity:g})"
            )
        sparsity = parsed.sparsity
    if sparsity is None:
        raise PrunekitError("sparsity is required with an unstructured pattern")
    if scope not in SCOPES:
        raise choice_error("scope", scope, SCOPES)
    if nsamples < 1:
        raise PrunekitError(f"nsamples must be at least 1, got {nsamples}")
    if propagate not in PROPAGATION:
        raise choice_error("propagation", propagate, PROPAGATION)
    check_dataset(calib)
    return PrunePlan(method_cls, config, parsed, check_sparsity(sparsity))


def prune(
    lm: LoadedModel,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    calib: str = "wikitext2",
    nsamples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    scope: str = "row",
    allocation: str = "uniform",
    device: str = "cpu",
    batch_size: int = 8,
    options: dict[str, Any] | None = None,
    propagate: str = "pruned",
) -> PruneRecord:
    """Prune `lm.model` in place and return how it was done.

    `sparsity` is the mean share of weights (or structure) removed; an N:M `pattern`
    implies it (1 - N/M). `options` are the method's own (`prunekit methods` lists them).
    """
    plan = plan_prune(method, sparsity, pattern, scope, nsamples, calib, options, propagate)
    _check_seqlen(lm, seqlen)
    if plan.pattern.is_nm:
        _check_nm_shapes(lm, plan.pattern)
    method_cls, config, parsed, sparsity = plan.method, plan.config, plan.pattern, plan.sparsity
    request = PruneRequest(
        sparsity=sparsity,
        pattern=parsed,
        scope=scope,
        device=device,
        batch_size=batch_size,
        seed=seed,
        propagate=propagate,
    )

    start = time.perf_counter()
    torch.manual_seed(seed)
    windows, calibration = None, None
    if method_cls.needs_calibration or allocation != "uniform":
        source = load_text(calib, purpose="calib")
        windows = calibration_windows(lm.tokenizer, source.text, nsamples, seqlen, seed)
        calibration = {
            "source": source.describe(),
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": seed,
            "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        }
    params_before = count_parameters(lm.model)
    request.layer_sparsity = allocate(allocation, lm, windows, request)
    details = method_cls(config).run(lm, windows, request) or {}
    request_dict = dataclasses.asdict(request)
    request_dict["pattern"] = str(parsed)
    request_dict["allocation"] = allocation
    return PruneRecord(
        source_model=lm.source,
        method=method,
        config=dataclasses.asdict(config),
        request=request_dict,
        calibration=calibration,
        layer_sparsity=layer_sparsity(lm.adapter),
        overall_sparsity=overall_sparsity(lm.adapter),
        parameters_before=params_before,
        parameters_after=count_parameters(lm.model),
        wall_time_s=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        details=details,
    )


def is_zeroshot_task(name: str) -> bool:
    """Whether `name` is a zero-shot task (else a perplexity dataset or text file)."""
    return canonical_task(name) is not None


def check_evaluation_name(name: str) -> None:
    """Fail with the valid names unless `name` is a zero-shot task, a perplexity dataset
    or an existing text file."""
    known = is_zeroshot_task(name) or name in DATASETS
    if not known and not Path(name).expanduser().is_file():
        raise choice_error("task", name, [*DATASETS, *TASKS, "<path to a .txt file>"])


def evaluate(
    lm: LoadedModel,
    tasks: list[str] | tuple[str, ...] = ("wikitext2",),
    seqlen: int = 1024,
    limit: int | None = None,
    batch_size: int | None = None,
    backend: str = "prunekit",
) -> dict[str, dict[str, Any]]:
    """Evaluate `lm` on each name in `tasks`: `{name: result dict}`, in the given order.

    Perplexity datasets (wikitext2, ptb, ... or a .txt path) give a `PerplexityResult`
    as dict; zero-shot tasks (piqa, arc_easy, ..., `prunekit.eval.tasks.TASKS`) give
    `{"acc", "acc_norm", "n", ...}` (LAMBADA: `acc`, `perplexity`). `limit` keeps the
    first `limit` windows of a perplexity dataset and the first `limit` items of a task.
    `batch_size`: windows (default 1) or packed items (default 16) per forward pass.
    `backend` scores zero-shot tasks with prunekit or lm-eval's HFLM ("lm-eval").
    """
    for task in tasks:
        check_evaluation_name(task)
    zeroshot = [t for t in tasks if is_zeroshot_task(t)]
    if len(zeroshot) < len(tasks):
        _check_seqlen(lm, seqlen)
    scored = evaluate_tasks(lm.model, lm.tokenizer, zeroshot, limit, batch_size or 16, backend)
    results = {}
    for task in tasks:
        if task in scored:
            results[task] = scored[task]
        else:
            result = perplexity(lm.model, lm.tokenizer, task, seqlen, limit, batch_size or 1)
            results[task] = result.as_dict()
    return results


def save(lm: LoadedModel, out: str | Path, record: PruneRecord, overwrite: bool = False) -> Path:
    """Write `lm` as a HF folder with its prunekit.json (atomically)."""
    return save_pruned(lm, out, record.as_dict(), overwrite)
