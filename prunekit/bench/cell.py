"""Run one cell in this process: load, prune (unless dense), evaluate, measure.

`peak_rss_mb` is the process's peak resident memory from the cell's start (the peak is
reset first where Linux allows, so it belongs to this cell alone; the interpreter and
libraries already resident count too, as they would in a fresh process).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from prunekit.bench.config import Cell, Execution
from prunekit.export.record import versions
from prunekit.process_memory import reset_peak_rss, step_peak_rss_mb


def _limit_groups(evaluation: dict[str, Any]) -> dict[int | None, list[str]]:
    """Tasks grouped by their limit, in task order: {limit: [task, ...]}."""
    groups: dict[int | None, list[str]] = {}
    for task in evaluation["tasks"]:
        groups.setdefault(evaluation["limit"].get(task), []).append(task)
    return groups


def data_hashes(calibration: dict | None, metrics: dict[str, dict]) -> dict[str, str]:
    """Every sha256 the run reports: calibration text and windows, each task's data."""
    hashes = {}
    if calibration:
        hashes["calibration_text"] = calibration["source"]["sha256"]
        hashes["calibration_windows"] = calibration["windows_sha256"]
    for task, result in metrics.items():
        for key, value in result.items():
            if key.endswith("sha256") and isinstance(value, str):
                hashes[f"{task}.{key}"] = value
    return hashes


def error_line(err: Exception) -> str:
    """An exception as one line: `Type: first line of its message`."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def run_cell(cell: Cell, execution: Execution) -> dict[str, Any]:
    """Execute `cell`; returns metrics, pruning facts, timings, peak RSS, versions, hashes."""
    import prunekit

    torch.set_num_threads(execution.threads)
    reset_peak_rss()
    start = time.perf_counter()
    lm = prunekit.load_model(cell.model, device="cpu")
    loaded = time.perf_counter()
    prune_facts: dict[str, Any] | None = None
    calibration = None
    if not cell.is_dense:
        calib = cell.calibration  # None for data-free methods
        calib_args = (
            {"calib": calib["dataset"], "nsamples": calib["nsamples"], "seqlen": calib["seqlen"]}
            if calib
            else {}
        )
        record = prunekit.prune(
            lm,
            method=cell.method,
            sparsity=cell.sparsity,
            pattern=cell.pattern or "unstructured",
            **calib_args,
            seed=cell.seed or 0,
            scope=cell.scope,
            allocation=cell.allocation or "uniform",
            propagate=cell.propagate or "pruned",
            device=execution.device,
            batch_size=execution.batch_size,
            options=cell.options,
        )
        calibration = record.calibration
        prune_facts = {
            "overall_sparsity": record.overall_sparsity,
            "parameters_before": record.parameters_before,
            "parameters_after": record.parameters_after,
            "wall_time_s": record.wall_time_s,
            "peak_rss_mb": record.peak_rss_mb,
            "calibration": calibration,
            "config": record.config,
            "details": record.details,
        }
    pruned = time.perf_counter()
    metrics: dict[str, dict] = {}
    for limit, tasks in _limit_groups(cell.evaluation).items():
        results = prunekit.evaluate(
            lm,
            tasks=tasks,
            seqlen=cell.evaluation["seqlen"],
            limit=limit,
            batch_size=execution.eval_batch_size,
        )
        metrics.update(results)
    end = time.perf_counter()
    return {
        "metrics": {task: metrics[task] for task in cell.evaluation["tasks"]},
        "prune": prune_facts,
        "timing": {
            "load_s": loaded - start,
            "prune_s": pruned - loaded,
            "eval_s": end - pruned,
            "total_s": end - start,
        },
        "peak_rss_mb": step_peak_rss_mb(),
        "versions": versions(),
        "data_hashes": data_hashes(calibration, metrics),
    }


def run_outcome(cell: Cell, execution: Execution) -> dict[str, Any]:
    """`run_cell` as an executor outcome: `{"result"}` or `{"error"}`, plus `wall_time_s`."""
    start = time.perf_counter()
    try:
        outcome: dict[str, Any] = {"result": run_cell(cell, execution)}
    except Exception as err:  # noqa: BLE001 - any failure is recorded against the cell
        outcome = {"error": error_line(err)}
    outcome["wall_time_s"] = time.perf_counter() - start
    return outcome


def run_outcome_from_dicts(cell: dict[str, Any], execution: dict[str, Any]) -> dict[str, Any]:
    """`run_outcome` for callers that ship plain dicts (worker processes, Ray tasks)."""
    return run_outcome(Cell(**cell), Execution(**execution))
