"""The Python API: `load_model`, `prune`, `evaluate`, `save`. The CLI is a thin layer on it."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from prunekit.allocations import Allocation, allocate, get_allocation
from prunekit.data import DATASETS, calibration_windows, check_dataset, check_protocol, load_text
from prunekit.engine.distributed import (
    barrier,
    init_from_environment,
    is_main,
    shard_windows,
    world,
)
from prunekit.engine.runner import COMPUTE_DTYPES, PROPAGATION
from prunekit.errors import PrunekitError, choice_error
from prunekit.eval.perplexity import perplexity
from prunekit.eval.tasks import TASKS, canonical_task
from prunekit.eval.zeroshot import evaluate_tasks
from prunekit.export.folder import check_output_dir, check_weights_format, save_pruned
from prunekit.export.record import (
    PruneRecord,
    count_parameters,
    layer_sparsity,
    overall_sparsity,
)
from prunekit.methods import (
    REGISTRY,
    LayerwiseMethod,
    Method,
    MethodConfig,
    PruneRequest,
    get_method,
)
from prunekit.methods.unstructured.updates import WeightUpdate, get_update
from prunekit.models.adapter import weight_matrix
from prunekit.models.loading import (
    LoadedModel,
    check_dtype,
    load_model,
    load_pruned,
    safetensors_folder,
)
from prunekit.models.offload import checkpoint_files, file_bytes
from prunekit.process_memory import peak_rss_mb, resident_bytes
from prunekit.surgery.masks import SCOPES, Pattern, check_sparsity

__all__ = [
    "check_device",
    "check_evaluation_name",
    "check_run",
    "check_seqlen",
    "check_weights_format",
    "default_eval_seqlen",
    "check_dtype",
    "check_protocol",
    "evaluate",
    "is_zeroshot_task",
    "load_model",
    "load_pruned",
    "needs_calibration",
    "plan_prune",
    "prune",
    "run_plan",
    "save",
]

DEFAULT_SPARSITY = 0.5


def check_seqlen(lm: LoadedModel, seqlen: int, name: str = "seqlen") -> None:
    """Fail unless 2 <= seqlen <= the model's context (`name`: the option, for the message)."""
    limit = lm.adapter.max_context
    if limit is not None and seqlen > limit:
        raise PrunekitError(f"{name} {seqlen} exceeds the model's context of {limit} tokens")
    if seqlen < 2:
        raise PrunekitError(f"{name} must be at least 2, got {seqlen}")


def default_eval_seqlen(lm: LoadedModel) -> int:
    """The evaluation window when none is given: min(1024, the model's context)."""
    limit = lm.adapter.max_context
    return 1024 if limit is None else min(1024, limit)


def _check_nm_shapes(lm: LoadedModel, pattern: Pattern) -> None:
    for block in lm.adapter.blocks:
        for path, module in lm.adapter.linears(block).items():
            in_features = weight_matrix(module).shape[1]
            if in_features % pattern.m:
                raise PrunekitError(
                    f"pattern {pattern} needs every layer's input width divisible by "
                    f"{pattern.m}; {path} has {in_features}"
                )


def _typed(name: str, value: Any, kinds: tuple[type, ...], what: str) -> Any:
    """`value` when it is one of `kinds` (bool is never a number), else a one-line error."""
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise PrunekitError(f"{name} must be {what}, got {value!r}")
    return value


def _at_least(name: str, value: Any, low: int) -> int:
    _typed(name, value, (int,), "an integer")
    if value < low:
        raise PrunekitError(f"{name} must be at least {low}, got {value}")
    return value


def check_device(device: str) -> str:
    """`cpu`, `cuda`, `cuda:N` or `mps`, available on this machine; a one-line error otherwise."""
    _typed("device", device, (str,), "a device name such as cpu or cuda:0")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise PrunekitError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise PrunekitError(f"device {device!r} asked for, but CUDA is not available here")
        if index and int(index) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise PrunekitError(f"device {device!r} asked for, but only {count} CUDA devices exist")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise PrunekitError("device 'mps' asked for, but MPS is not available here")
    return device


def check_compute_dtype(method: type[Method], compute_dtype: str) -> None:
    """Refuse an unknown precision, or a lower one for a method that cannot use it."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise choice_error("compute dtype", compute_dtype, COMPUTE_DTYPES)
    if compute_dtype != "auto" and not method.compute_dtypes:
        raise PrunekitError(
            f"method {method.name!r} computes in the weights' dtype; valid compute dtype: auto"
        )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_memory(text: str) -> int:
    """Bytes in a size such as "4GiB", "512MB" or "2000000000"."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if value <= 0 or unit not in _UNITS:
        raise PrunekitError(f"memory size {text!r} not understood; valid: e.g. 4GiB, 512MB, 8GB")
    return int(value * _UNITS[unit])


def gib(n: int) -> str:
    """A byte count for people: GiB from 1 GiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def checkpoint_bytes(source: str) -> int:
    """Size on disk of `source`'s safetensors weights (a GGUF file is converted first)."""
    return file_bytes(checkpoint_files(safetensors_folder(source)))


def check_architecture(method: type[Method], lm: LoadedModel) -> None:
    """Refuse a method the model's architecture cannot take: width and low-rank methods
    on mixture-of-experts models (their MLPs are experts), expert pruning on dense ones."""
    moe = bool(lm.adapter.spec.moe)
    if moe and method.kind in ("structured", "lowrank"):
        raise PrunekitError(
            f"{method.name} does not prune mixture-of-experts models yet; use expert_prune, "
            "a mask method (attention linears) or a depth method"
        )
    if not moe and method.kind == "experts":
        raise PrunekitError(
            f"{method.name} needs a mixture-of-experts model; {lm.adapter.config.model_type} "
            "has dense MLPs"
        )


def check_streams(method: type[Method]) -> None:
    """Refuse blocks on disk for a method that needs the whole model in memory."""
    if not method.streams:
        streaming = sorted(n for n, m in REGISTRY.items() if m.streams)
        raise PrunekitError(
            f"method {method.name!r} needs the whole model in memory; with --offload disk "
            f"use one of: {', '.join(streaming)}"
        )


def check_offload(plan: PrunePlan, out: Path | None, tasks: list[str]) -> None:
    """What `--offload disk` needs: a method that works block by block, an output folder
    to write the blocks to, and no in-memory evaluation."""
    check_streams(plan.method)
    if out is None:
        raise PrunekitError("--offload disk writes each pruned block to --out; give --out DIR")
    if tasks:
        raise PrunekitError(
            "--offload disk keeps no block in memory to evaluate; drop --eval and run "
            "`prunekit eval` on the saved folder"
        )


def check_offload_budget(lm: LoadedModel, nsamples: int, seqlen: int, budget: int) -> bool:
    """Fit one streamed step into `budget`: what the process holds now (the interpreter,
    libraries, embedding and head), one block read and its staged copy, a float32 working
    copy of the widest linear, and the activations [nsamples, seqlen, hidden] (inputs and
    outputs of a block). When only the activations do not fit, they go to file-backed
    buffers in the staging folder (returns True); when the rest does not fit, the budget
    is refused before any work."""
    offload = lm.adapter.offload
    now = resident_bytes()
    block = max(offload.block_bytes(i) for i in range(len(lm.adapter.blocks)))
    widest = max(m.weight.numel() for m in lm.adapter.linears(lm.adapter.blocks[0]).values())
    activations = 2 * nsamples * seqlen * lm.model.config.hidden_size * 4
    need = now + 2 * block + 3 * 4 * widest
    if need > budget:
        raise PrunekitError(
            f"--max-memory {gib(budget)} is below one streamed step: loaded {gib(now)} + one "
            f"block twice {gib(2 * block)} + float32 work {gib(12 * widest)} = {gib(need)} "
            f"(activations {gib(activations)} can go to disk); valid: at least {gib(need)}"
        )
    if need + activations <= budget:
        return False
    offload.activations = offload.staging / "activations"
    return True


def init_distributed(device: str) -> str:
    """Join torchrun's process group when started by torchrun (else nothing); the device
    this process computes on."""
    return init_from_environment(device)


def check_run(device: str, batch_size: int) -> None:
    """The run options `run_plan` takes, checked before any model loads."""
    check_device(device)
    _at_least("batch size", batch_size, 1)


def needs_calibration(
    method_cls: type[Method],
    allocation: Allocation | type[Allocation],
    update: WeightUpdate | None = None,
) -> bool:
    """Whether a run of `method_cls` with this allocation and update reads calibration data."""
    return method_cls.needs_calibration or allocation.needs_calibration or update is not None


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """A validated pruning request, checked before any model is loaded.

    It holds what decides the pruning itself; `run_plan` adds how it runs (calibration
    window length, seed, device, batch size).
    """

    method: type[Method]
    config: MethodConfig
    pattern: Pattern
    sparsity: float
    allocation: Allocation
    update: WeightUpdate | None = None
    scope: str = "row"
    propagate: str = "pruned"
    calib: str = "wikitext2"
    nsamples: int = 64

    @property
    def needs_calibration(self) -> bool:
        """Whether the method, the allocation or the update reads calibration windows."""
        return needs_calibration(self.method, self.allocation, self.update)

    def make_method(self) -> Method:
        """The method instance, carrying the weight update when one is requested."""
        if self.update is None:
            return self.method(self.config)
        return self.method(self.config, update=self.update)

    def make_request(
        self, seed: int, device: str, batch_size: int, compute_dtype: str = "auto"
    ) -> PruneRequest:
        """The request every method reads (per-block ratios are added by the allocation)."""
        return PruneRequest(
            sparsity=self.sparsity,
            pattern=self.pattern,
            scope=self.scope,
            device=device,
            batch_size=batch_size,
            seed=seed,
            propagate=self.propagate,
            compute_dtype=compute_dtype,
        )


def split_method(method: str, update: str = "none") -> tuple[str, str]:
    """`"wanda+admm"` is shorthand for method "wanda" with update "admm"."""
    name, plus, suffix = method.partition("+")
    if not plus:
        return method, update
    if update != "none" and update != suffix:
        raise PrunekitError(f"method {method!r} names update {suffix!r} but update is {update!r}")
    return name, suffix


def plan_update(
    method_cls: type[Method], update: str, options: dict[str, Any] | None
) -> WeightUpdate | None:
    """The requested weight update (None for "none"), checked against the method."""
    if update == "none":
        if options:
            raise PrunekitError("update options given but no update requested (--update)")
        return None
    update_cls = get_update(update)
    if not issubclass(method_cls, LayerwiseMethod):
        raise PrunekitError(
            f"update {update!r} needs a layer-wise mask method; {method_cls.name!r} "
            f"({method_cls.kind}) is not one"
        )
    return update_cls(update_cls.Config.from_options(options or {}))


def plan_prune(
    method: str,
    sparsity: float | None,
    pattern: str = "unstructured",
    scope: str | None = None,
    nsamples: int = 64,
    calib: str = "wikitext2",
    options: dict[str, Any] | None = None,
    propagate: str = "pruned",
    allocation: str | Allocation = "uniform",
    update: str = "none",
    update_options: dict[str, Any] | None = None,
) -> PrunePlan:
    """Check everything about a request that does not need the model; one-line errors.

    `method` may be `"NAME+UPDATE"` (e.g. `"wanda+admm"`), the same as `update="UPDATE"`.
    `scope` None takes the method's reference scope (`Method.default_scope`).
    `sparsity` None means 0.5 (or, for a depth method given `blocks`, blocks / depth);
    what it measures depends on the method (`Method.sparsity_meaning`).
    """
    _typed("method", method, (str,), "a method name (see `prunekit methods`)")
    if sparsity is not None:
        _typed("sparsity", sparsity, (int, float), "a number in [0, 1)")
    _typed("pattern", pattern, (str,), "'unstructured' or N:M such as '2:4'")
    _typed("allocation", allocation, (str, Allocation), "an allocation spec such as 'owl'")
    _at_least("nsamples", nsamples, 1)
    method, update = split_method(method, update)
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
    if getattr(config, "blocks", 0) > 0:
        if sparsity is not None:
            raise PrunekitError(
                f"give sparsity or option blocks={config.blocks}, not both "
                f"({method} removes blocks, so either fixes how many)"
            )
        sparsity = 0.0  # replaced by blocks / depth when the method runs
    if sparsity is None:
        sparsity = DEFAULT_SPARSITY
    scope = method_cls.default_scope if scope is None else scope
    if scope not in SCOPES:
        raise choice_error("scope", scope, SCOPES)
    if propagate not in PROPAGATION:
        raise choice_error("propagation", propagate, PROPAGATION)
    check_dataset(calib)
    alloc = get_allocation(allocation)
    if method_cls.no_allocation and alloc.name != "uniform":
        raise PrunekitError(
            f"allocation {alloc.name!r} does not apply: {method_cls.no_allocation}; "
            "use allocation uniform"
        )
    if parsed.is_nm and alloc.name != "uniform":
        raise PrunekitError(
            f"allocation {alloc.name!r} needs an unstructured pattern; N:M fixes every "
            f"block at {parsed.sparsity:g}"
        )
    return PrunePlan(
        method=method_cls,
        config=config,
        pattern=parsed,
        sparsity=check_sparsity(sparsity),
        allocation=alloc,
        update=plan_update(method_cls, update, update_options),
        scope=scope,
        propagate=propagate,
        calib=calib,
        nsamples=nsamples,
    )


def prune(
    lm: LoadedModel,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    calib: str = "wikitext2",
    nsamples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    scope: str | None = None,
    allocation: str | Allocation = "uniform",
    device: str = "cpu",
    batch_size: int = 8,
    options: dict[str, Any] | None = None,
    propagate: str = "pruned",
    update: str = "none",
    update_options: dict[str, Any] | None = None,
    protocol: str = "reference",
    compute_dtype: str = "auto",
) -> PruneRecord:
    """Plan (`plan_prune`) and run (`run_plan`) a pruning of `lm.model` in place.

    `sparsity` is the mean share of weights (or structure) removed, 0.5 when None; an N:M
    `pattern` implies it (1 - N/M). Its unit is the method's (`Method.sparsity_meaning`):
    weights zeroed per linear, decoder-block parameters removed, blocks removed.
    `options` are the method's own (`prunekit methods` lists them).
    `allocation` spreads the mean over the blocks: `uniform`, `owl[:m=5,lam=0.08]`,
    `file:PATH.json` (block index -> ratio), or an `Allocation` instance.
    `update` re-fits the kept weights after the mask ("admm", "alps", "sparsegpt"; or
    write `method="wanda+admm"`), with `update_options` its own options.
    `protocol` cuts the calibration windows: "reference" (random crops of the token
    stream, as the papers do) or "bos" (BOS first in every window).
    `compute_dtype` "bfloat16" / "float16" runs the calibration forwards under autocast
    (about 2x faster on CPUs with AVX-512 BF16; statistics and solves stay float32);
    "auto" computes in the weights' dtype.
    """
    plan = plan_prune(
        method,
        sparsity,
        pattern,
        scope,
        nsamples,
        calib,
        options,
        propagate,
        allocation,
        update,
        update_options,
    )
    return run_plan(
        lm,
        plan,
        seqlen=seqlen,
        seed=seed,
        device=device,
        batch_size=batch_size,
        protocol=protocol,
        compute_dtype=compute_dtype,
    )


def _calibration(
    lm: LoadedModel, plan: PrunePlan, seqlen: int, seed: int, protocol: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The plan's calibration windows [nsamples, seqlen] and their description for the record."""
    source = load_text(plan.calib, purpose="calib")
    windows = calibration_windows(lm.tokenizer, source.text, plan.nsamples, seqlen, seed, protocol)
    return windows, {
        "source": source.describe(),
        "nsamples": plan.nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "protocol": protocol,
        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }


def run_plan(
    lm: LoadedModel,
    plan: PrunePlan,
    *,
    seqlen: int = 512,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 8,
    protocol: str = "reference",
    compute_dtype: str = "auto",
) -> PruneRecord:
    """Prune `lm.model` in place as `plan` (from `plan_prune`) says; return how it was done.

    `seqlen` is the calibration window length (tokens), `seed` seeds every random choice,
    `device` is where the current block computes, `batch_size` windows per forward pass,
    `protocol` how calibration windows are cut ("reference" or "bos"), `compute_dtype` the
    precision of calibration forwards ("auto", "bfloat16", "float16").
    """
    check_protocol(protocol)
    check_run(device, batch_size)
    check_compute_dtype(plan.method, compute_dtype)
    if lm.adapter.offload is not None:
        check_streams(plan.method)
    ranks = world()[1]
    if ranks > 1 and not plan.method.distributes:
        spread = sorted(n for n, m in REGISTRY.items() if m.distributes)
        raise PrunekitError(
            f"method {plan.method.name!r} runs on one process; with {ranks} processes use "
            f"one of: {', '.join(spread)}"
        )
    _at_least("seed", seed, 0)
    check_seqlen(lm, seqlen)
    check_architecture(plan.method, lm)
    if plan.pattern.is_nm:
        _check_nm_shapes(lm, plan.pattern)
    request = plan.make_request(seed, device, batch_size, compute_dtype)

    start = time.perf_counter()
    torch.manual_seed(seed)
    windows, calibration = None, None
    if plan.needs_calibration:
        windows, calibration = _calibration(lm, plan, seqlen, seed, protocol)
        windows = shard_windows(windows)  # this rank's share (all of them on one process)
    params_before = count_parameters(lm.model)
    allocated = allocate(plan.allocation, lm, windows, request)
    request.layer_sparsity = allocated.ratios
    method = plan.make_method()
    details = method.run(lm, windows, request) or {}
    if plan.allocation.name != "uniform":
        details = {**details, "allocation": allocated.details}
    request_dict = dataclasses.asdict(request)
    request_dict["pattern"] = str(plan.pattern)
    request_dict["allocation"] = plan.allocation.spec
    request_dict["update"] = plan.update.name if plan.update else "none"
    request_dict["dtype"] = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    request_dict["offload"] = "none" if lm.adapter.offload is None else "disk"
    request_dict["processes"] = ranks
    return PruneRecord(
        source_model=lm.source,
        method=plan.method.name,
        config=dataclasses.asdict(plan.config),
        request=request_dict,
        calibration=calibration,
        layer_sparsity=layer_sparsity(lm.adapter),
        overall_sparsity=overall_sparsity(lm.adapter),
        parameters_before=params_before,
        parameters_after=count_parameters(lm.model),
        wall_time_s=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        details=details,
        outcome=method.outcome(details),
        update=plan.update.describe() if plan.update else None,
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
    tasks: list[str] | tuple[str, ...] | str = ("wikitext2",),
    seqlen: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    backend: str = "prunekit",
    protocol: str = "reference",
) -> dict[str, dict[str, Any]]:
    """Evaluate `lm` on each name in `tasks`: `{name: result dict}`, in the given order.

    Perplexity datasets (wikitext2, ptb, ... or a .txt path) give a `PerplexityResult`
    as dict; zero-shot tasks (piqa, arc_easy, ..., `prunekit.eval.tasks.TASKS`) give
    `{"acc", "acc_norm", "n", ...}` (LAMBADA: `acc`, `perplexity`). `limit` keeps the
    first `limit` windows of a perplexity dataset and the first `limit` items of a task.
    `batch_size`: windows (default 1) or packed items (default 16) per forward pass.
    `backend` scores zero-shot tasks with prunekit or lm-eval's HFLM ("lm-eval").
    `seqlen` None is min(1024, the model's context). `protocol` cuts perplexity windows:
    "reference" (the field's: nothing added to a window) or "bos" (BOS first in every
    window); it is written into each result.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    _typed("tasks", tasks, (list, tuple), "a task name or a list of them")
    if lm.adapter.offload is not None:
        raise PrunekitError(
            "this model's blocks are on disk (offload); save it and evaluate the saved folder"
        )
    if not tasks:
        raise PrunekitError("no task given; name perplexity datasets or zero-shot tasks")
    if limit is not None:
        _at_least("limit", limit, 1)
    if batch_size is not None:
        _at_least("batch size", batch_size, 1)
    check_protocol(protocol)
    seqlen = default_eval_seqlen(lm) if seqlen is None else seqlen
    for task in tasks:
        check_evaluation_name(task)
    zeroshot = [t for t in tasks if is_zeroshot_task(t)]
    if len(zeroshot) < len(tasks):
        check_seqlen(lm, seqlen)
    scored = evaluate_tasks(lm.model, lm.tokenizer, zeroshot, limit, batch_size or 16, backend)
    results = {}
    for task in tasks:
        if task in scored:
            results[task] = scored[task]
        else:
            result = perplexity(
                lm.model, lm.tokenizer, task, seqlen, limit, batch_size or 1, protocol
            )
            results[task] = result.as_dict()
    return results


def save(
    lm: LoadedModel,
    out: str | Path,
    record: PruneRecord,
    overwrite: bool = False,
    weights: str = "dense",
) -> Path:
    """Write `lm` as a HF folder with its prunekit.json (atomically). `weights` is
    "dense" or "sparse-bitmask" (compressed-tensors' format for the pruned linears). In a
    process group every rank holds the same model: rank 0 writes it, the others wait."""
    check_weights_format(weights, lm)
    if is_main():  # rank 0 checks and writes the folder; the others wait for it
        check_output_dir(out, overwrite)
    if not isinstance(record, PruneRecord):
        raise PrunekitError(
            f"record must be the PruneRecord prunekit.prune returned, got {record!r}"
        )
    if not is_main():
        barrier()
        return Path(out)
    path = save_pruned(lm, out, record.as_dict(), overwrite, weights=weights)
    barrier()
    return path
