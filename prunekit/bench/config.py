"""Sweep configuration: a YAML grid expanded into cells, each keyed by a hash of itself.

A cell is one pruning run (or a dense baseline) with everything that decides its result:
model, method, options, sparsity, pattern, scope, allocation, calibration, evaluation, seed
and the prunekit version. Execution settings (device, batch sizes, threads, executor)
do not change results and are not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from prunekit.allocations import ALLOCATIONS
from prunekit.api import needs_calibration
from prunekit.engine.runner import PROPAGATION
from prunekit.errors import PrunekitError, read_text
from prunekit.methods import get_method
from prunekit.settings import VERSION
from prunekit.surgery.masks import SCOPES, Pattern, check_sparsity

DENSE = "dense"

TOP_KEYS = {
    "models": "list of model sources (HF folder, hub id, .gguf, alias)",
    "methods": "list of method names or {name, options} mappings",
    "sparsities": "list of sparsities in [0, 1)",
    "patterns": "list of patterns: unstructured or N:M",
    "allocations": "list of per-block allocations",
    "scope": "row or layer (default: each method's reference scope)",
    "propagate": "pruned or dense: which outputs feed the next block while calibrating",
    "seed": "integer seed of every random choice",
    "calibration": "mapping: dataset, nsamples, seqlen",
    "evaluation": "mapping: tasks, seqlen, limit",
    "execution": "mapping: device, batch_size, eval_batch_size, threads",
    "dense": "true to add the dense baseline of each model (default true)",
}
CALIBRATION_KEYS = {"dataset": str, "nsamples": int, "seqlen": int}
EVALUATION_KEYS = {"tasks": list, "seqlen": int, "limit": (int, dict, type(None))}
EXECUTION_KEYS = {
    "device": str,
    "batch_size": int,
    "eval_batch_size": (int, type(None)),
    "threads": int,
}


@dataclass
class Cell:
    """One run of the grid. `method == "dense"` is the unpruned baseline of `model`."""

    model: str
    method: str
    evaluation: dict[str, Any]  # tasks (list), seqlen, limit ({task: int | None})
    version: str
    options: dict[str, Any] = field(default_factory=dict)
    sparsity: float | None = None
    pattern: str | None = None
    scope: str | None = None
    allocation: str | None = None
    calibration: dict[str, Any] | None = None  # dataset, nsamples, seqlen
    propagate: str | None = None  # with calibration: "pruned" or "dense" block outputs
    seed: int | None = None

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        """sha256 of the cell's canonical JSON: equal keys mean equal results."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        """Short human name, e.g. `wanda 50% 2:4` or `dense`."""
        if self.is_dense:
            return f"{self.model} dense"
        parts = [self.model, series_name(self.method, self.options, self.pattern, self.allocation)]
        parts.append(f"{self.sparsity:.0%}")
        return " ".join(parts)


def series_name(method: str, options: dict, pattern: str | None, allocation: str | None) -> str:
    """The name of a curve in the plots: method, its options, non-default pattern/allocation."""
    name = method
    if options:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
    if pattern and pattern != "unstructured":
        name += f" {pattern}"
    if allocation and allocation != "uniform":
        name += f" [{allocation}]"
    return name


@dataclass
class Execution:
    """How cells run; never part of a cell's key."""

    device: str = "cpu"
    batch_size: int = 8  # calibration windows per forward pass
    eval_batch_size: int | None = None  # None: prunekit.evaluate's defaults
    threads: int = 2


@dataclass
class SweepConfig:
    """A parsed sweep: its cells (dense baselines first) and how to run them."""

    cells: list[Cell]
    execution: Execution
    # combinations of the grid that cannot run, each "method x pattern x allocation: why"
    impossible: list[str] = field(default_factory=list)


def _fail(where: str, message: str) -> PrunekitError:
    return PrunekitError(f"sweep config {where}: {message}")


def _check_keys(where: str, mapping: Any, valid: dict) -> dict:
    if not isinstance(mapping, dict):
        raise _fail(where, f"must be a mapping with keys {', '.join(valid)}")
    for key in mapping:
        if key not in valid:
            raise _fail(where, f"unknown key {key!r}; valid: {', '.join(valid)}")
    return mapping


def _typed(where: str, value: Any, kind: Any) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise _fail(where, f"needs {names}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise _fail(where, f"must be at least 1, got {value}")
    return value


def _list(raw: dict, key: str, default: list | None = None) -> list:
    value = raw.get(key, default)
    if value is None:
        raise _fail(key, f"is required ({TOP_KEYS[key]})")
    if not isinstance(value, list) or not value:
        raise _fail(key, f"must be a non-empty list ({TOP_KEYS[key]}), got {value!r}")
    return value


def _methods(raw: dict) -> list[tuple[str, dict]]:
    methods = []
    for i, entry in enumerate(_list(raw, "methods")):
        where = f"methods[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        entry = _check_keys(where, entry, {"name": None, "options": None})
        name, options = entry.get("name"), entry.get("options") or {}
        if not isinstance(name, str):
            raise _fail(where, f"needs a method name, got {name!r}")
        if name == DENSE:
            raise _fail(where, "'dense' is added per model by `dense: true`, not as a method")
        if not isinstance(options, dict):
            raise _fail(f"{where}.options", f"must be a mapping of option: value, got {options!r}")
        try:
            get_method(name).Config.from_options(options)
        except PrunekitError as err:
            raise _fail(where, str(err)) from None
        methods.append((name, dict(options)))
    return methods


def _sparsities(raw: dict) -> list[float]:
    given = raw.get("sparsities", [])
    if not isinstance(given, list):
        raise _fail("sparsities", f"must be a list ({TOP_KEYS['sparsities']}), got {given!r}")
    values = []
    for i, value in enumerate(given):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise _fail(f"sparsities[{i}]", f"needs a number in [0, 1), got {value!r}")
        try:
            values.append(check_sparsity(value))
        except PrunekitError as err:
            raise _fail(f"sparsities[{i}]", str(err)) from None
    return values


def _patterns(raw: dict) -> list[str]:
    patterns = []
    for i, text in enumerate(_list(raw, "patterns", ["unstructured"])):
        try:
            patterns.append(str(Pattern.parse(str(text))))
        except PrunekitError as err:
            raise _fail(f"patterns[{i}]", str(err)) from None
    return patterns


def _allocations(raw: dict) -> list[str]:
    allocations = _list(raw, "allocations", ["uniform"])
    for i, name in enumerate(allocations):
        if name not in ALLOCATIONS:
            raise _fail(f"allocations[{i}]", f"unknown {name!r}; valid: {', '.join(ALLOCATIONS)}")
    return allocations


def _calibration(raw: dict) -> dict:
    given = _check_keys("calibration", raw.get("calibration") or {}, CALIBRATION_KEYS)
    calib = {"dataset": "wikitext2", "nsamples": 64, "seqlen": 512} | given
    for key, kind in CALIBRATION_KEYS.items():
        _typed(f"calibration.{key}", calib[key], kind)
    return calib


def _is_task(name: str) -> bool:
    """A perplexity dataset, a zero-shot task (or alias), or a text file."""
    from prunekit.api import is_zeroshot_task
    from prunekit.data import DATASETS

    return name in DATASETS or is_zeroshot_task(name) or Path(name).is_file()


def known_tasks() -> list[str]:
    """Evaluation names for error messages: perplexity datasets and zero-shot tasks."""
    from prunekit.data import DATASETS
    from prunekit.eval.tasks import TASKS

    return [*DATASETS, *TASKS]


def _evaluation(raw: dict) -> dict:
    given = _check_keys("evaluation", raw.get("evaluation") or {}, EVALUATION_KEYS)
    evaluation = {"tasks": ["wikitext2"], "seqlen": 1024, "limit": None} | given
    for key, kind in EVALUATION_KEYS.items():
        _typed(f"evaluation.{key}", evaluation[key], kind)
    tasks = evaluation["tasks"]
    for i, task in enumerate(tasks):
        if not isinstance(task, str) or not _is_task(task):
            names = ", ".join(known_tasks())
            raise _fail(f"evaluation.tasks[{i}]", f"unknown task {task!r}; valid: {names}")
    if not tasks:
        raise _fail("evaluation.tasks", "must name at least one task")
    limit = evaluation["limit"]
    if isinstance(limit, dict):
        for task, value in limit.items():
            if task not in tasks:
                raise _fail("evaluation.limit", f"names {task!r}, which is not in tasks")
            _typed(f"evaluation.limit.{task}", value, (int, type(None)))
        limits = {task: limit.get(task) for task in tasks}
    else:
        limits = dict.fromkeys(tasks, limit)
    return {"tasks": list(tasks), "seqlen": evaluation["seqlen"], "limit": limits}


def _execution(raw: dict) -> Execution:
    given = _check_keys("execution", raw.get("execution") or {}, EXECUTION_KEYS)
    for key, value in given.items():
        _typed(f"execution.{key}", value, EXECUTION_KEYS[key])
    return Execution(**given)


def parse_config(raw: Any, version: str | None = None) -> SweepConfig:
    """Validate a sweep mapping (from YAML) and expand it into cells."""
    version = version or VERSION
    raw = _check_keys("(top level)", raw, TOP_KEYS)
    models = _list(raw, "models")
    for i, model in enumerate(models):
        if not isinstance(model, str):
            raise _fail(f"models[{i}]", f"needs a model source string, got {model!r}")
    methods, patterns = _methods(raw), _patterns(raw)
    sparsities, allocations = _sparsities(raw), _allocations(raw)
    if "unstructured" in patterns and not sparsities:
        raise _fail("sparsities", "is required with the unstructured pattern")
    scope = raw.get("scope")  # absent: each method's reference scope
    if scope is not None and scope not in SCOPES:
        raise _fail("scope", f"unknown {scope!r}; valid: {', '.join(SCOPES)}")
    propagate = raw.get("propagate", "pruned")
    if propagate not in PROPAGATION:
        raise _fail("propagate", f"unknown {propagate!r}; valid: {', '.join(PROPAGATION)}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail("seed", f"needs an integer, got {seed!r}")
    dense = raw.get("dense", True)
    if not isinstance(dense, bool):
        raise _fail("dense", f"needs true or false, got {dense!r}")
    calibration, evaluation = _calibration(raw), _evaluation(raw)

    common = {"evaluation": evaluation, "seed": seed, "version": version}
    cells: list[Cell] = []
    impossible: list[str] = []
    for model in models:
        if dense:
            cells.append(Cell(model=model, method=DENSE, evaluation=evaluation, version=version))
        for (name, options), pattern, allocation in product(methods, patterns, allocations):
            method_cls = get_method(name)
            uses_data = needs_calibration(method_cls, ALLOCATIONS.lookup(allocation))
            nm = Pattern.parse(pattern)
            reason = _impossible(method_cls, nm, allocation)
            if reason:
                impossible.append(f"{name} x {pattern} x {allocation}: {reason}")
                continue
            for sparsity in [nm.sparsity] if nm.is_nm else sparsities:
                cell = Cell(
                    model=model,
                    method=name,
                    options=options,
                    sparsity=sparsity,
                    pattern=pattern,
                    allocation=allocation,
                    calibration=calibration if uses_data else None,
                    propagate=propagate if uses_data else None,
                    scope=scope or method_cls.default_scope,
                    **common,
                )
                cells.append(cell)
    if not any(cell.method != DENSE for cell in cells):
        raise _fail("methods", "no combination of the grid can run: " + "; ".join(impossible))
    return SweepConfig(
        cells=cells, execution=_execution(raw), impossible=list(dict.fromkeys(impossible))
    )


def _impossible(method_cls: type, pattern: Pattern, allocation: str) -> str | None:
    """Why this method x pattern x allocation cannot run, or None when it can."""
    if pattern.is_nm and not method_cls.supports_nm:
        return f"{method_cls.kind} methods do not make N:M patterns"
    if method_cls.no_allocation and ALLOCATIONS.lookup(allocation).name != "uniform":
        return method_cls.no_allocation
    if pattern.is_nm and ALLOCATIONS.lookup(allocation).name != "uniform":
        return "a non-uniform allocation needs the unstructured pattern (N:M fixes each block)"
    return None


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML file."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"sweep config not found: {path}")
    try:
        raw = yaml.safe_load(read_text(path, "sweep config"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PrunekitError(f"sweep config {path} is not valid YAML{where}") from None
    return parse_config(raw)
