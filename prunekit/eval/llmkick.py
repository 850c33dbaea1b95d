"""The LLM-Kick view (Jaiswal et al., ICLR 2024): knowledge versus commonsense/language.

Perplexity can stay close to dense while knowledge-heavy tasks collapse. This view puts
each task group's retained accuracy (pruned / dense, mean over the group's tasks) beside
the perplexity ratio (pruned / dense), so that gap is visible.
"""

from __future__ import annotations

import math
from typing import Any

from prunekit.eval.tasks import canonical_task

GROUPS: dict[str, tuple[str, ...]] = {
    # LLM-Kick's knowledge-intensive tasks scored on generated answers (exact match)
    "closed-book QA": ("triviaqa", "jeopardy", "bigbench_qa_wikidata"),
    "knowledge": (
        "arc_easy",
        "arc_challenge",
        "openbook_qa",
        "commonsense_qa",
        "lambada_openai",
    ),
    "commonsense/language": (
        "piqa",
        "hellaswag",
        "winogrande",
        "copa",
        "siqa",
        "boolq",
        "winograd_wsc",
    ),
}


def _ratio(pruned: float, dense: float) -> float:
    return pruned / dense if dense > 0 else math.nan


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def llmkick_view(
    dense: dict[str, dict[str, Any]], pruned: dict[str, dict[str, Any]], metric: str = "acc"
) -> dict[str, Any]:
    """Retained accuracy per task and per group, and perplexity ratios.

    `dense` and `pruned` are `prunekit.evaluate` results (task or dataset -> result dict).
    Returns `{"metric", "tasks": {task: {dense, pruned, retained}}, "groups": {group:
    {tasks, dense, pruned, retained}}, "perplexity_ratio": {dataset: ratio}}`; a group
    with none of its tasks evaluated is left out. `retained` of a group is the mean of its
    tasks' pruned/dense ratios (tasks with a dense score of zero are skipped);
    `retained_above_chance` is (pruned − chance) / (dense − chance), LLM-Kick's chance
    correction, with tasks whose dense score is at or below chance skipped.
    """
    tasks: dict[str, dict[str, float]] = {}
    perplexity_ratio: dict[str, float] = {}
    for name, before in dense.items():
        after = pruned.get(name)
        if after is None:
            continue
        canonical = canonical_task(name)
        if canonical is None and "perplexity" in before:
            perplexity_ratio[name] = _ratio(after["perplexity"], before["perplexity"])
        elif canonical is not None and metric in before and metric in after:
            chance = float(before.get("chance", 0.0))
            tasks[canonical] = {
                "dense": before[metric],
                "pruned": after[metric],
                "chance": chance,
                "retained": _ratio(after[metric], before[metric]),
                "retained_above_chance": _ratio(after[metric] - chance, before[metric] - chance),
            }
    groups = {}
    for group, members in GROUPS.items():
        present = [t for t in members if t in tasks]
        if present:
            groups[group] = {
                "tasks": present,
                "dense": _mean([tasks[t]["dense"] for t in present]),
                "pruned": _mean([tasks[t]["pruned"] for t in present]),
                "retained": _mean([tasks[t]["retained"] for t in present]),
                "retained_above_chance": _mean(
                    [tasks[t]["retained_above_chance"] for t in present]
                ),
            }
    return {
        "metric": metric,
        "tasks": tasks,
        "groups": groups,
        "perplexity_ratio": perplexity_ratio,
    }


def format_llmkick(view: dict[str, Any]) -> str:
    """The view as a Markdown table: one row per group, then one per perplexity dataset."""
    lines = [
        f"| group | tasks | dense {view['metric']} | pruned {view['metric']} | retained "
        "| retained above chance |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for group, row in view["groups"].items():
        lines.append(
            f"| {group} | {', '.join(row['tasks'])} | {row['dense']:.4f} | "
            f"{row['pruned']:.4f} | {row['retained']:.3f} | {row['retained_above_chance']:.3f} |"
        )
    for dataset, ratio in view["perplexity_ratio"].items():
        lines.append(f"| perplexity ratio | {dataset} | | | {ratio:.3f} | |")
    return "\n".join(lines)
