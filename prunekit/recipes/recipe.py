"""A recipe is a list of stages applied in order to one model: any registered pruning
method with its arguments, or `heal`. Every stage is checked before any work starts; each
finished stage is saved, so a rerun of an interrupted recipe resumes after the last one.

YAML form (`prunekit prune MODEL --recipe FILE.yaml --out DIR`):

    stages:
      - {method: shortgpt, sparsity: 0.1}
      - {method: flap, sparsity: 0.2}
      - {method: sparsegpt, pattern: "2:4", allocation: owl}   # refused: after a width stage
      - {heal: distill, steps: 100}
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunekit import api
from prunekit.errors import PrunekitError
from prunekit.export.folder import check_output_dir, read_record, save_pruned
from prunekit.export.record import count_parameters, overall_sparsity
from prunekit.models.loading import LoadedModel, load_model, load_pruned
from prunekit.process_memory import reset_peak_rss, step_peak_rss_mb
from prunekit.recovery import heal_model, make_config

PRUNE_FIELDS = {
    "sparsity": (float, int),
    "pattern": str,
    "scope": str,
    "allocation": str,
    "calib": str,
    "nsamples": int,
    "seqlen": int,
    "seed": int,
    "options": dict,
    "update": str,
    "update_options": dict,
    "batch_size": int,
}


@dataclass
class PruneStage:
    method: str
    args: dict[str, Any] = field(default_factory=dict)  # PRUNE_FIELDS of prunekit.prune


@dataclass
class HealStage:
    method: str  # lora | masked_lora | perp | distill
    args: dict[str, Any] = field(default_factory=dict)  # HealConfig / TrainSettings fields


Stage = PruneStage | HealStage


def _stage(index: int, entry: Any) -> Stage:
    where = f"recipe stage {index + 1}"
    if not isinstance(entry, dict) or ("method" in entry) == ("heal" in entry):
        raise PrunekitError(f"{where}: give exactly one of 'method' (a pruning) or 'heal'")
    if "heal" in entry:
        return HealStage(str(entry["heal"]), {k: v for k, v in entry.items() if k != "heal"})
    args = {k: v for k, v in entry.items() if k != "method"}
    for key, value in args.items():
        if key not in PRUNE_FIELDS:
            raise PrunekitError(
                f"{where} ({entry['method']}): unknown field '{key}'; "
                f"valid: {', '.join(sorted(PRUNE_FIELDS))}"
            )
        if not isinstance(value, PRUNE_FIELDS[key]) or isinstance(value, bool):
            raise PrunekitError(f"{where} ({entry['method']}): field '{key}' has the wrong type")
    return PruneStage(str(entry["method"]), args)


def load_recipe(path: str | Path) -> list[Stage]:
    """The stages of a YAML recipe file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PrunekitError(f"cannot read recipe {path}: {str(err).splitlines()[0]}") from err
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list) or not stages:
        raise PrunekitError(f"recipe {path}: needs a non-empty list 'stages'")
    return [_stage(i, entry) for i, entry in enumerate(stages)]


def check_recipe(stages: list[Stage]) -> list:
    """Validate every stage before any work; returns each stage's plan or heal config."""
    checked, pruned, width_stage = [], False, None
    for i, stage in enumerate(stages):
        where = f"recipe stage {i + 1} ({stage.method})"
        try:
            if isinstance(stage, HealStage):
                if not pruned:
                    raise PrunekitError("healing before any pruning stage")
                checked.append(make_config(method=stage.method, **stage.args))
                continue
            args = stage.args
            plan = api.plan_prune(
                stage.method,
                args.get("sparsity"),
                args.get("pattern", "unstructured"),
                args.get("scope"),
                args.get("nsamples", 64),
                args.get("calib", "wikitext2"),
                args.get("options"),
                "pruned",
                args.get("allocation", "uniform"),
                args.get("update", "none"),
                args.get("update_options"),
            )
        except PrunekitError as err:
            raise PrunekitError(f"{where}: {err}") from err
        if plan.pattern.is_nm and width_stage is not None:
            raise PrunekitError(
                f"{where}: N:M after width stage {width_stage}, which can leave MLP widths "
                f"not divisible by {plan.pattern.m}; put N:M before width pruning"
            )
        if plan.method.kind == "structured":
            width_stage = i + 1
        pruned = True
        checked.append(plan)
    return checked


def _fingerprint(source: str, stages: list[Stage]) -> str:
    text = json.dumps([source, [(type(s).__name__, asdict(s)) for s in stages]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_recipe(
    source: str, stages: list[Stage], out: str | Path, overwrite: bool = False, device: str = "cpu"
) -> dict:
    """Apply `stages` to the model `source` and write the result to `out`; prunekit.json
    records every stage (options, seconds, peak RSS, parameters and sparsity after it)."""
    out = check_output_dir(out, overwrite)
    checked = check_recipe(stages)
    work = out.with_name(f".{out.name}.recipe-{_fingerprint(source, stages)}")
    done = sorted(work.glob("stage-*"), key=lambda p: int(p.name.split("-")[1]))
    if done:
        lm, record = load_pruned(done[-1], dtype="float32"), read_record(done[-1])
        start = len(done)
    else:
        lm, record, start = load_model(source, dtype="float32"), {"source_model": source}, 0
        record["stages"] = []
    for i in range(start, len(stages)):
        lm, record = _run_stage(lm, record, stages[i], checked[i], device)
        save_pruned(lm, work / f"stage-{i + 1}", record)
    save_pruned(lm, out, record, overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return record


def _run_stage(
    lm: LoadedModel, record: dict, stage: Stage, checked: Any, device: str
) -> tuple[LoadedModel, dict]:
    reset_peak_rss()
    began = time.perf_counter()
    if isinstance(stage, HealStage):
        if checked.method == "distill" and checked.teacher is None:
            checked.teacher = record["source_model"]
        facts = heal_model(lm, checked).record
        kind = "heal"
    else:
        pruned = api.run_plan(
            lm,
            checked,
            seqlen=stage.args.get("seqlen", 512),
            seed=stage.args.get("seed", 0),
            device=device,
            batch_size=stage.args.get("batch_size", 8),
        ).as_dict()
        facts = {k: pruned[k] for k in ("config", "outcome", "overall_sparsity", "details")}
        kind = "prune"
        keep = {"source_model": record["source_model"], "stages": record["stages"]}
        record = {**record, **pruned, **keep, "method": "recipe"}
    entry = {
        "kind": kind,
        "method": stage.method,
        "args": stage.args,
        "seconds": round(time.perf_counter() - began, 2),
        "peak_rss_mb": round(step_peak_rss_mb(), 1),
        "parameters_after": count_parameters(lm.model),
        "sparsity_after": round(overall_sparsity(lm.adapter), 6),
        "facts": facts,
    }
    return lm, {**record, "stages": [*record["stages"], entry]}
